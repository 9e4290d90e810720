"""Model storage: ``spec.model`` and the plain ``spec.volumes`` / ``spec.volumeMounts`` -> pod spec parts.

``storageUri`` says where the model lives:

- ``pvc://CLAIM/PATH``: the claim is mounted read-only at ``/mnt/models``; the model is ``/mnt/models/PATH``.
- ``https://…``, ``http://…``, ``s3://BUCKET/KEY``: an init container running the serving image's
  ``aqueduct-fetch`` downloads the file into an ``emptyDir`` before the serving container starts
  (checking ``sha256`` when given); the serving container mounts it read-only at ``/mnt/models``.

Either way the serving container gets ``MODEL_PATH``, the model's path, in its environment (a handler
reads it, or a step's ``options`` name the same path; a ``runtime`` step without ``model`` serves it).
Pure functions: no I/O.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

MODEL_DIR = "/mnt/models"
MODEL_VOLUME = "model"
MODEL_PATH_ENV = "MODEL_PATH"
FETCH_CONTAINER = "fetch-model"
FETCH_SCHEMES = ("https", "http", "s3")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class StorageError(ValueError):
    """A storage field is invalid: ``field`` is its path under ``spec``, e.g. ``model.storageUri``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class S3:
    """Where and how to reach S3: a custom endpoint (MinIO, Ceph), a region, a Secret with credentials."""

    endpoint: str | None = None
    region: str | None = None
    secret_name: str | None = None


@dataclass(frozen=True)
class Model:
    """A validated ``spec.model``."""

    storage_uri: str
    sha256: str | None = None
    s3: S3 = S3()

    @property
    def scheme(self) -> str:
        return urlsplit(self.storage_uri).scheme

    @property
    def fetched(self) -> bool:
        """Whether an init container downloads it (not a PVC)."""
        return self.scheme in FETCH_SCHEMES

    @property
    def path(self) -> str:
        """The model's path inside the serving container (``MODEL_PATH``)."""
        parts = urlsplit(self.storage_uri)
        if self.scheme == "pvc":
            return posixpath.join(MODEL_DIR, parts.path.lstrip("/")).rstrip("/") or MODEL_DIR
        return posixpath.join(MODEL_DIR, _file_name(parts.path))


def _file_name(path: str) -> str:
    """The name ``aqueduct-fetch`` gives the download: the URI path's last segment, percent-decoded."""
    return unquote(path.rsplit("/", 1)[-1])


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise StorageError(field, f"must be a non-empty string, got {value!r}")
    return value


def parse_model(raw: Any) -> Model:
    """Validate ``spec.model``.

    Raises:
        StorageError: naming the field (relative to ``spec``).
    """
    if not isinstance(raw, Mapping):
        raise StorageError("model", f"must be an object, got {type(raw).__name__}")
    extra = sorted(set(raw) - {"storageUri", "sha256", "s3"})
    if extra:
        raise StorageError(f"model.{extra[0]}", "unknown field (known: s3, sha256, storageUri)")
    uri = _text(raw.get("storageUri"), "model.storageUri")
    parts = urlsplit(uri)
    if parts.scheme not in ("pvc", *FETCH_SCHEMES):
        raise StorageError("model.storageUri", f"must start with pvc://, https://, http:// or s3://, got {uri!r}")
    if parts.scheme == "pvc":
        if not parts.netloc or len(parts.netloc) > 253 or not DNS1123_SUBDOMAIN_RE.match(parts.netloc):
            raise StorageError("model.storageUri", f"pvc://CLAIM/PATH needs a valid claim name, got {uri!r}")
        if ".." in parts.path.split("/"):
            raise StorageError("model.storageUri", f"the path must stay inside the claim, got {uri!r}")
    elif not parts.netloc or _file_name(parts.path) in ("", ".", "..") or "/" in _file_name(parts.path):
        raise StorageError("model.storageUri", f"must name a host (bucket) and end in a file name, got {uri!r}")
    sha256 = raw.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_RE.match(sha256)):
        raise StorageError("model.sha256", f"must be 64 lowercase hex digits, got {sha256!r}")
    if sha256 is not None and parts.scheme == "pvc":
        raise StorageError("model.sha256", "is checked when the model is downloaded; a pvc:// model is not")
    return Model(uri, sha256, _s3(raw.get("s3"), parts.scheme))


def _s3(raw: Any, scheme: str) -> S3:
    if raw is None:
        return S3()
    if scheme != "s3":
        raise StorageError("model.s3", "applies to s3:// URIs only")
    if not isinstance(raw, Mapping):
        raise StorageError("model.s3", f"must be an object, got {type(raw).__name__}")
    extra = sorted(set(raw) - {"endpoint", "region", "secretName"})
    if extra:
        raise StorageError(f"model.s3.{extra[0]}", "unknown field (known: endpoint, region, secretName)")
    endpoint = raw.get("endpoint")
    if endpoint is not None and urlsplit(_text(endpoint, "model.s3.endpoint")).scheme not in ("http", "https"):
        raise StorageError("model.s3.endpoint", f"must be an http(s):// URL, got {endpoint!r}")
    secret = raw.get("secretName")
    if secret is not None and not DNS1123_SUBDOMAIN_RE.match(_text(secret, "model.s3.secretName")):
        raise StorageError("model.s3.secretName", f"must be a Secret's name, got {secret!r}")
    region = raw.get("region")
    return S3(endpoint, None if region is None else _text(region, "model.s3.region"), secret)


RESERVED_VOLUMES = frozenset({"config", "dshm", "tmp", MODEL_VOLUME})
RESERVED_MOUNTS = ("/etc/aqueduct", "/dev/shm", "/tmp", MODEL_DIR)


def parse_volumes(raw: Any) -> tuple[Mapping[str, Any], ...]:
    """Validate ``spec.volumes`` (pod volumes, passed through): names unique and not the operator's own.

    Raises:
        StorageError: naming the field (relative to ``spec``).
    """
    if not isinstance(raw, list):
        raise StorageError("volumes", f"must be a list, got {type(raw).__name__}")
    names: list[str] = []
    for i, volume in enumerate(raw):
        if not isinstance(volume, Mapping):
            raise StorageError(f"volumes[{i}]", f"must be an object, got {type(volume).__name__}")
        name = _text(volume.get("name"), f"volumes[{i}].name")
        if not DNS1123_LABEL_RE.match(name) or len(name) > 63:
            raise StorageError(f"volumes[{i}].name", f"must be a DNS-1123 label, got {name!r}")
        if name in RESERVED_VOLUMES:
            raise StorageError(f"volumes[{i}].name", f"{name!r} is used by the operator")
        if name in names:
            raise StorageError(f"volumes[{i}].name", f"duplicate volume name {name!r}")
        names.append(name)
    return tuple(dict(volume) for volume in raw)


def parse_volume_mounts(raw: Any, volumes: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    """Validate ``spec.volumeMounts`` (of the serving container): each names one of ``spec.volumes``.

    Raises:
        StorageError: naming the field (relative to ``spec``).
    """
    if not isinstance(raw, list):
        raise StorageError("volumeMounts", f"must be a list, got {type(raw).__name__}")
    declared = {volume["name"] for volume in volumes}
    for i, mount in enumerate(raw):
        if not isinstance(mount, Mapping):
            raise StorageError(f"volumeMounts[{i}]", f"must be an object, got {type(mount).__name__}")
        name = _text(mount.get("name"), f"volumeMounts[{i}].name")
        if name not in declared:
            raise StorageError(f"volumeMounts[{i}].name", f"no volume named {name!r} in spec.volumes")
        path = _text(mount.get("mountPath"), f"volumeMounts[{i}].mountPath")
        taken = next((p for p in RESERVED_MOUNTS if path.rstrip("/") == p or path.startswith(p + "/")), None)
        if not path.startswith("/") or taken:
            why = f"{taken} is the operator's" if taken else "must be an absolute path"
            raise StorageError(f"volumeMounts[{i}].mountPath", f"{why}, got {path!r}")
    return tuple(dict(mount) for mount in raw)


def model_volume(model: Model) -> dict[str, Any]:
    """The pod volume holding the model: the claim (read-only) or an ``emptyDir`` for the download."""
    if model.fetched:
        return {"name": MODEL_VOLUME, "emptyDir": {}}
    return {"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": urlsplit(model.storage_uri).netloc,
                                                            "readOnly": True}}


def model_mount() -> dict[str, Any]:
    """The serving container's (read-only) mount of the model volume."""
    return {"name": MODEL_VOLUME, "mountPath": MODEL_DIR, "readOnly": True}


def fetch_container(model: Model, image: str, security_context: Mapping[str, Any]) -> dict[str, Any]:
    """The init container that downloads a fetched model with ``aqueduct-fetch`` (same image as the server)."""
    args = ["aqueduct-fetch", model.storage_uri, MODEL_DIR]
    if model.sha256:
        args += ["--sha256", model.sha256]
    if model.s3.endpoint:
        args += ["--s3-endpoint", model.s3.endpoint]
    if model.s3.region:
        args += ["--s3-region", model.s3.region]
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": image,
        "args": args,
        "volumeMounts": [{"name": MODEL_VOLUME, "mountPath": MODEL_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        # The last lines of its output become the termination message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(security_context),
    }
    if model.s3.secret_name:
        container["envFrom"] = [{"secretRef": {"name": model.s3.secret_name}}]
    return container
