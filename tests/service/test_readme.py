"""The README's "Serve your own model" runs as written: its files written out, its commands run in a
fresh directory (the only change: the port, 8080 there, a free one here), its answers checked against
the handler run in process, its load-test recipe run with wrk."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from aqueduct_service import InferenceTask

from bench.processes import free_port, group_pids
from tests.service.conftest import REPO, START_BOUND_S, wait_for

SECTION = "## Serve your own model"
BIN = Path(sys.executable).parent  # aqueduct-serve is installed beside the interpreter, as in a user's venv


def section_blocks() -> list[tuple[str, str]]:
    """The section's fenced code blocks as (language, text)."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION + "\n")
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"^```(\w+)\n(.*?)^```$", text[start:end], re.S | re.M)


def files(blocks: list[tuple[str, str]]) -> dict[str, str]:
    """Blocks whose first line names a file (``# mymodel/handler.py``), by file name."""
    named = {}
    for _, text in blocks:
        first, _, rest = text.partition("\n")
        match = re.fullmatch(r"# (\S+\.(?:py|yaml))", first)
        if match:
            named[match.group(1)] = text
    return named


def shell_block(blocks: list[tuple[str, str]], starts: str) -> str:
    (text,) = [text for lang, text in blocks if lang == "sh" and text.startswith(starts)]
    return text


@dataclass
class Served:
    url: str
    port: int
    workdir: Path

    def run(self, script: str, *, shell: bool = True) -> str:
        """Run a README block (port 8080 replaced) in the working directory; its stdout."""
        script = script.replace("localhost:8080", f"localhost:{self.port}")
        command = ["bash", "-euo", "pipefail", "-c", script] if shell else [sys.executable, "-c", script]
        done = subprocess.run(command, cwd=self.workdir, env=user_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: the venv on PATH, no PYTHONPATH (the handler comes from --app-dir), no AQUEDUCT_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUEDUCT_") and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    blocks = section_blocks()
    workdir = tmp_path_factory.mktemp("readme")
    for name, text in files(blocks).items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    port = free_port()
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", "exec " + shell_block(blocks, "aqueduct-serve")],
            cwd=workdir,
            env=user_env(AQUEDUCT_SERVER__PORT=str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/v2/health/ready").status_code == 200
        return False

    try:
        wait_for(ready, START_BOUND_S, "the README's server")
        yield Served(url, port, workdir)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        leftovers = group_pids(proc.pid)
        if leftovers or proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert not leftovers and proc.returncode == 0, log.read_text()


def in_process(workdir: Path, x: list[float]) -> np.ndarray:
    """The README's handler run here, on one request."""
    spec = importlib.util.spec_from_file_location("readme_handler", workdir / "mymodel/handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.MLPHandler(device="cpu")
    handler.on_start()
    task = InferenceTask({"x": np.array(x, np.float32)})
    handler.handle(task)
    y: np.ndarray = task.outputs["y"]
    return y


def test_the_files_are_complete() -> None:
    named = files(section_blocks())
    assert set(named) == {"mymodel/handler.py", "mymodel/pipeline.yaml"}
    assert "version: 1" in named["mymodel/pipeline.yaml"] and "name: mlp" in named["mymodel/pipeline.yaml"]


def test_curl_and_tritonclient_get_the_models_answer(served: Served) -> None:
    blocks = section_blocks()
    answer = json.loads(served.run(shell_block(blocks, "curl -s localhost:8080/v2/models/mlp/infer")))
    (y,) = answer["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [3]
    expected = in_process(served.workdir, [5.1, 3.5, 1.4, 0.2])
    np.testing.assert_allclose(y["data"], expected, rtol=1e-5)
    (client,) = [text for lang, text in blocks if lang == "python" and "tritonclient" in text]
    printed = served.run(client, shell=False)
    assert "max_queue_delay_microseconds" in printed and "2000" in printed
    first = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", printed.splitlines()[0])]
    np.testing.assert_allclose(first, expected, rtol=1e-4)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_the_load_test_recipe_batches(served: Served) -> None:
    recipe = shell_block(section_blocks(), "cat > post.lua")
    assert "-d10s" in recipe
    out = served.run(recipe.replace("-d10s", "-d3s"))
    assert "Requests/sec" in out and "Non-2xx" not in out, out
    metrics = dict(re.findall(r"^aqueduct_batch_size_(sum|count)\{[^}]*\} (\S+)$", out, re.M))
    assert float(metrics["sum"]) / float(metrics["count"]) > 1.5, out  # 32 connections: requests share batches


def test_a_handler_module_not_found_says_where_it_was_looked_for(tmp_path: Path) -> None:
    named = files(section_blocks())
    (tmp_path / "project/mymodel").mkdir(parents=True)
    for name, text in named.items():
        (tmp_path / "project" / name).write_text(text)
    done = subprocess.run(
        ["aqueduct-serve", "--config", "project/mymodel/pipeline.yaml"],  # run from the directory above
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot import module 'mymodel.handler'" in done.stderr
    assert "run it where mymodel/ is, or pass --app-dir" in done.stderr
