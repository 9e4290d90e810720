"""A signed S3 ``GetObject`` request with the standard library alone (AWS Signature Version 4).

``aqueduct-fetch`` needs one S3 call; boto3 would be the usual tool, but botocore's dependency bounds
conflict with the operator's ``kubernetes`` client in the one image, and one request does not need
an SDK. Works with AWS (virtual-hosted addressing) and with S3-compatible services such as MinIO or
Ceph (path-style addressing on the given endpoint).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class Credentials:
    """An access key pair, and the session token of temporary credentials."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials | None:
        """``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; None without a key pair."""
        env = os.environ if environ is None else environ
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            return None
        return cls(key, secret, env.get("AWS_SESSION_TOKEN") or None)


def region_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``us-east-1``."""
    env = os.environ if environ is None else environ
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def object_url(bucket: str, key: str, endpoint: str | None, region: str) -> str:
    """The object's URL: path-style on ``endpoint``, or AWS's virtual-hosted style without one."""
    path = quote(key, safe="/~")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{bucket}/{path}"
    return f"https://{bucket}.s3.{region}.amazonaws.com/{path}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    credentials: Credentials,
    region: str,
    now: datetime.datetime,
    payload_sha256: str = EMPTY_SHA256,
) -> dict[str, str]:
    """``headers`` plus ``host``, ``x-amz-date``, ``x-amz-content-sha256`` (and the token) and their signature.

    Every header given is signed. ``url``'s path must already be URI-encoded (as :func:`object_url` does).
    """
    parts = urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    signed = {k.lower(): v.strip() for k, v in headers.items()}
    signed.update({"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    names = sorted(signed)
    query = "&".join(sorted(parts.query.split("&"))) if parts.query else ""
    canonical = "\n".join([
        method,
        parts.path or "/",
        query,
        "".join(f"{name}:{signed[name]}\n" for name in names),
        ";".join(names),
        payload_sha256,
    ])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + credentials.secret_access_key).encode(), amz_date[:8])
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed


def get_object_request(
    bucket: str, key: str, *, endpoint: str | None, region: str, credentials: Credentials | None
) -> urllib.request.Request:
    """A ``GET`` of the object, signed when there are credentials (anonymous otherwise: public buckets)."""
    url = object_url(bucket, key, endpoint, region)
    headers = {"User-Agent": "aqueduct-fetch"}
    if credentials is not None:
        now = datetime.datetime.now(datetime.timezone.utc)
        headers = sign("GET", url, headers, credentials, region, now)
    return urllib.request.Request(url, headers=headers, method="GET")
