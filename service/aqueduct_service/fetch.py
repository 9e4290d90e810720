"""``aqueduct-fetch URI DEST``: download a model file before the serving container starts.

The operator runs it as the serving pod's init container (same image) for a Pipeline whose
``spec.model.storageUri`` is ``https://``, ``http://`` or ``s3://``; the file lands in ``DEST`` (an
``emptyDir`` the serving container mounts read-only) under the URI's last path segment. The download
goes to a hidden partial file first, is checked against ``--sha256`` when given, and is renamed into
place only when complete, so the serving container never sees half a file.

S3 credentials come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``: the operator fills it from the Pipeline's Secret; without them the request is
anonymous); ``--s3-endpoint`` (or ``AWS_ENDPOINT_URL``) points at another S3 service (MinIO, Ceph, ...).
Any failure exits 1 with one line naming the URI, which Kubernetes keeps as the init container's
termination message.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree

from . import s3

CHUNK = 1 << 20
HTTP_TIMEOUT_S = 60.0
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SCHEMES = ("https", "http", "s3")


class FetchError(Exception):
    """The model could not be fetched; the message names the URI and says why."""


def file_name(uri: str) -> str:
    """The name the model gets in the destination folder: the URI's last path segment.

    Raises:
        FetchError: the URI has an unsupported scheme, no host or bucket, or no file name.
    """
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise FetchError(f"{uri}: unsupported scheme {parts.scheme!r} (supported: {', '.join(SCHEMES)})")
    if not parts.netloc:
        raise FetchError(f"{uri}: no {'bucket' if parts.scheme == 's3' else 'host'} in the URI")
    name = unquote(parts.path.rsplit("/", 1)[-1])
    if name in ("", ".", "..") or "/" in name:
        raise FetchError(f"{uri}: the URI names no file (it must end in a file name)")
    return name


def _chunks(request: urllib.request.Request, uri: str) -> Iterator[bytes]:
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            while chunk := response.read(CHUNK):
                yield chunk
    except urllib.error.HTTPError as e:
        raise FetchError(f"{uri}: {_http_error(e)}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise FetchError(f"{uri}: cannot download: {reason}") from e


def _http_error(e: urllib.error.HTTPError) -> str:
    """``HTTP 404 Not Found``, or S3's own error code and message from its XML body."""
    try:
        error = ElementTree.fromstring(e.read(64 * 1024))
    except (ElementTree.ParseError, OSError):
        return f"HTTP {e.code} {e.reason}"
    code, message = error.findtext("Code"), error.findtext("Message")
    return f"S3 {code}: {message} (HTTP {e.code})" if code else f"HTTP {e.code} {e.reason}"


def _request(uri: str, s3_endpoint: str | None, s3_region: str | None) -> urllib.request.Request:
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        return urllib.request.Request(uri, headers={"User-Agent": "aqueduct-fetch"})
    return s3.get_object_request(
        parts.netloc,
        unquote(parts.path.lstrip("/")),
        endpoint=s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None,
        region=s3_region or s3.region_from_env(),
        credentials=s3.Credentials.from_env(),
    )


def fetch(
    uri: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> Path:
    """Download ``uri`` into the folder ``dest`` and return the file's path.

    Raises:
        FetchError: naming the URI: a bad URI, a failed download, or a checksum that does not match
            (nothing is left in ``dest`` then).
    """
    if sha256 is not None and not SHA256_RE.match(sha256):
        raise FetchError(f"{uri}: --sha256 must be 64 lowercase hex digits, got {sha256!r}")
    target = Path(dest) / file_name(uri)
    partial = target.with_name(f".{target.name}.partial")
    chunks = _chunks(_request(uri, s3_endpoint, s3_region), uri)
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise FetchError(f"{uri}: sha256 mismatch: expected {sha256}, got {digest.hexdigest()}")
        os.replace(partial, target)
    except OSError as e:
        raise FetchError(f"{uri}: cannot write {target}: {e.strerror or e}") from e
    finally:
        partial.unlink(missing_ok=True)
    return target


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="aqueduct-fetch",
        description="Download a model (https://, http://, s3://) into a folder; exits 1 naming the URI on failure.",
    )
    parser.add_argument("uri", help="https://host/path/model.pt or s3://bucket/key/model.pt")
    parser.add_argument("dest", help="destination folder (created if missing)")
    parser.add_argument("--sha256", help="expected sha256 of the file (64 hex digits); a mismatch fails")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--s3-region", help="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fetcher; returns the process exit code."""
    args = parse_args(argv)
    try:
        Path(args.dest).mkdir(parents=True, exist_ok=True)
        path = fetch(
            args.uri, args.dest, sha256=args.sha256, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region
        )
    except FetchError as e:
        print(f"aqueduct-fetch: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"aqueduct-fetch: {args.uri}: cannot create {args.dest}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"aqueduct-fetch: {args.uri} -> {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
