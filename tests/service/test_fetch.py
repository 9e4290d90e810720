"""``aqueduct-fetch`` (the serving pod's init container) against real servers on loopback: HTTP and S3 (moto)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aqueduct_service.fetch import main

from bench.processes import terminate

from .conftest import REPO, free_port, server_env, wait_for

MODEL = bytes(range(256)) * 4096 + b"weights"  # 1 MiB and a bit: more than one chunk
MODEL_SHA256 = hashlib.sha256(MODEL).hexdigest()
BUCKET = "models"
MOTO_PYTHON = REPO / ".venv" / "moto" / "bin" / "python"  # scripts/setup-venv makes it
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        """No access log on stderr (the tests read the fetcher's stderr)."""


@pytest.fixture(scope="module")
def http_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP file server on loopback serving ``resnet/model.pt``."""
    root = tmp_path_factory.mktemp("www")
    (root / "resnet").mkdir()
    (root / "resnet" / "model.pt").write_bytes(MODEL)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="http-models", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 in server mode (its own process, from .venv/moto) with ``s3://models/resnet/model.pt`` in it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(MOTO_PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: _answers(endpoint, proc, log), 60, "moto's S3 server")
        _put(f"{endpoint}/{BUCKET}", b"")
        _put(f"{endpoint}/{BUCKET}/resnet/model.pt", MODEL)
        yield endpoint
    finally:
        terminate(proc)


def _answers(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"moto exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
    try:
        with urllib.request.urlopen(endpoint, timeout=5):
            return True
    except OSError:
        return False


def _put(url: str, body: bytes) -> None:
    """An unsigned PUT (moto accepts it): creates a bucket or an object."""
    request = urllib.request.Request(url, data=body, method="PUT", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200, reply.status


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials from the environment, as the operator passes the Pipeline's Secret."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def fetched(dest: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in dest.iterdir()}


def test_http_download_with_checksum(http_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "models"
    assert main([f"{http_url}/resnet/model.pt", str(dest), "--sha256", MODEL_SHA256]) == 0
    assert fetched(dest) == {"model.pt": MODEL}
    assert f"-> {dest / 'model.pt'}" in capsys.readouterr().out


def test_s3_download_with_endpoint_region_and_credentials(s3_endpoint: str, aws_env: None, tmp_path: Path) -> None:
    argv = ["s3://models/resnet/model.pt", str(tmp_path), "--s3-endpoint", s3_endpoint, "--s3-region", "us-east-1"]
    assert main([*argv, "--sha256", MODEL_SHA256]) == 0
    assert fetched(tmp_path) == {"model.pt": MODEL}


@pytest.mark.parametrize(
    ("uri", "extra", "message"),
    [
        ("{http}/resnet/missing.pt", [], "{http}/resnet/missing.pt: HTTP 404"),
        ("{http}/resnet/model.pt", ["--sha256", "0" * 64], f"sha256 mismatch: expected {'0' * 64}, got {MODEL_SHA256}"),
        ("{http}/resnet/model.pt", ["--sha256", "abc"], "--sha256 must be 64 lowercase hex digits"),
        ("http://127.0.0.1:{closed}/model.pt", [], "http://127.0.0.1:{closed}/model.pt: cannot download:"),
        ("ftp://example.com/model.pt", [], "ftp://example.com/model.pt: unsupported scheme 'ftp'"),
        ("{http}/resnet/", [], "{http}/resnet/: the URI names no file"),
        ("{http}/resnet/..%2Fescape.pt", [], "{http}/resnet/..%2Fescape.pt: the URI names no file"),
        ("s3:///model.pt", [], "s3:///model.pt: no bucket in the URI"),
        ("s3://models/resnet/missing.pt", ["--s3-endpoint", "{s3}"], "s3://models/resnet/missing.pt: S3 NoSuchKey: "),
        ("s3://nobucket/model.pt", ["--s3-endpoint", "{s3}"], "s3://nobucket/model.pt: S3 NoSuchBucket: "),
        ("s3://models/resnet/model.pt", ["--s3-endpoint", "{s3}", "--sha256", "1" * 64], "sha256 mismatch"),
    ],
)
def test_failures_name_the_uri_and_leave_nothing(
    http_url: str,
    s3_endpoint: str,
    aws_env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    uri: str,
    extra: list[str],
    message: str,
) -> None:
    fill = {"http": http_url, "s3": s3_endpoint, "closed": str(free_port())}
    uri, message = uri.format(**fill), message.format(**fill)
    assert main([uri, str(tmp_path), *(arg.format(**fill) for arg in extra)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"aqueduct-fetch: {uri}: ") and message in err, err
    assert fetched(tmp_path) == {}


def test_console_script_in_a_pod_like_environment(s3_endpoint: str, tmp_path: Path) -> None:
    """As the init container runs it: its own process, credentials in the environment, exit status and stderr."""
    env = server_env({**CREDENTIALS, "HOME": str(tmp_path)})
    dest = tmp_path / "mnt" / "models"
    for key, status in (("resnet/model.pt", 0), ("resnet/gone.pt", 1)):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "aqueduct_service.fetch",
                f"s3://{BUCKET}/{key}",
                str(dest),
                "--s3-endpoint",
                s3_endpoint,
                "--s3-region",
                "eu-west-1",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == status, done.stderr
    assert f"s3://{BUCKET}/resnet/gone.pt: S3 NoSuchKey" in done.stderr
    assert fetched(dest) == {"model.pt": MODEL}
