"""The serving pod's configuration: a YAML file, then ``AQUEDUCT_*`` environment overrides, then JSON Schema.

The file format is ``config.schema.json`` (the operator renders ConfigMaps against the same schema).
An environment variable ``AQUEDUCT_<KEY>[__<KEY>...]`` replaces one value: keys are matched
case-insensitively, a key under ``STEPS`` names a step (``-`` may be written ``_``) or gives its index,
and the value is parsed as a YAML scalar (``32`` is an int, ``null`` is None, ``0.5`` a float).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from aqueduct.cpus import available_cpus

ENV_PREFIX = "AQUEDUCT_"
SCHEMA_PATH = Path(__file__).with_name("config.schema.json")
#: The model file a runtime step serves when it names none (the operator sets it from ``spec.model``).
MODEL_PATH_ENV = "MODEL_PATH"


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending field."""


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output tensor (OIP model metadata); ``-1`` in ``shape`` matches any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StepSettings:
    """One flow step: its handler (``"package.module:ClassName"``), worker count, batching and options.

    A step has either a ``handler`` or a built-in ``runtime`` (``onnx``, ``torch``, ``sklearn``,
    ``xgboost``, ``lightgbm``) with the ``model`` file it serves. ``options`` are keyword arguments of
    the handler's constructor, or the runtime's options (see ``docs/RUNTIMES.md``).
    """

    name: str
    handler: str | None = None
    runtime: str | None = None
    model: str | None = None
    nprocs: int = 1
    batch_size: int = 1
    batch_timeout: float = 0.0
    latency_target: float | None = None
    handle_condition: str | None = None
    #: ``all`` (every worker sees every GPU) or ``per_worker`` (worker i sees GPU i mod G).
    gpus: str = "all"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerSettings:
    """HTTP server options."""

    host: str = "0.0.0.0"
    port: int = 8080
    #: The OIP v2 gRPC service's port, served by every HTTP process beside HTTP; 0: no gRPC.
    grpc_port: int = 8081
    max_body_bytes: int = 64 * 1024 * 1024
    graceful_timeout: float = 30.0
    log_level: str = "info"
    #: ``json``, ``text`` or ``auto`` (text on a terminal); see ``logs.py``.
    log_format: str = "auto"
    #: Share of answered requests that get an access log line (1: all, 0: none).
    access_log: float = 0.01
    #: HTTP front-end processes; None: ``default_workers()``.
    workers: int | None = None
    arena_bytes: int = 32 * 1024 * 1024
    #: Connection bounds, per HTTP process (``connections.py``).
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: int = 5
    max_connections: int = 1000
    #: Bytes of request bodies the pod reads and decodes at once (split among the front ends); beyond: 503.
    decode_budget_bytes: int = 128 * 1024 * 1024

    @property
    def front_ends(self) -> int:
        """How many HTTP front-end processes serve: ``workers``, or the default for this pod's CPUs."""
        return self.workers if self.workers is not None else default_workers()


def with_host(settings: Settings, host: str) -> Settings:
    """``settings`` with ``server.host`` set to ``host`` (the address the command line or the main process bound)."""
    return replace(settings, server=replace(settings.server, host=host))


def default_workers(cpus: float | None = None) -> int:
    """Front-end processes for a pod with ``cpus`` CPUs (default: what this process may use).

    Below 4 CPUs, one process does HTTP and scheduling (no hop between processes); from 4 CPUs on,
    half of the CPUs serve HTTP, at most 8, and the rest are left to the flow's workers.
    """
    cpus = available_cpus() if cpus is None else cpus
    return 1 if cpus < 4 else min(8, int(cpus // 2))


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one serving pod (one model, one flow)."""

    name: str
    steps: tuple[StepSettings, ...]
    platform: str = "aqueduct"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    #: Requests carry N rows along a leading batch dimension; None: set when a runtime's model is batched.
    batch_dim: bool | None = None
    queue_size: int | None = None
    queue_priorities: int = 1
    timeout: float = 5.0
    start_timeout: float | None = None
    server: ServerSettings = field(default_factory=ServerSettings)


@cache
def config_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file."""
    with SCHEMA_PATH.open(encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def load_settings(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file at ``path``, apply ``AQUEDUCT_*`` overrides from ``environ``, validate.

    Raises:
        ConfigError: the file is unreadable or invalid; the message names the field.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {e}") from e
    return parse_settings(raw, os.environ if environ is None else environ)


def parse_settings(raw: Any, environ: Mapping[str, str]) -> Settings:
    """Apply ``AQUEDUCT_*`` overrides from ``environ`` to the parsed document ``raw`` and validate it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    sources = _apply_env_overrides(raw, environ)
    _validate(raw, sources)
    return _to_settings(raw, environ)


def signature_json(settings: Settings) -> str:
    """The pod's inputs, outputs and ``batch_dim`` as JSON: how the main process, which read them from
    the runtime steps' models, hands them to its front ends (see ``with_signature``)."""
    inputs, outputs = ([[t.name, t.datatype, list(t.shape)] for t in ts] for ts in (settings.inputs, settings.outputs))
    return json.dumps({"inputs": inputs, "outputs": outputs, "batch_dim": settings.batch_dim})


def with_signature(settings: Settings, text: str) -> Settings:
    """``settings`` with the inputs, outputs and ``batch_dim`` of ``signature_json``'s ``text``."""
    doc = json.loads(text)
    inputs, outputs = (tuple(TensorSpec(n, d, tuple(s)) for n, d, s in doc[kind]) for kind in ("inputs", "outputs"))
    return replace(settings, inputs=inputs, outputs=outputs, batch_dim=doc["batch_dim"])


def field_path(path: Any) -> str:
    """Render a jsonschema error path as ``steps[0].batch_size``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def _apply_env_overrides(doc: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Set each ``AQUEDUCT_A__B`` value into ``doc``; return {field path: env var} for error messages."""
    sources: dict[str, str] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX:
            continue
        keys = var[len(ENV_PREFIX) :].lower().split("__")
        try:
            value = yaml.safe_load(environ[var])
        except yaml.YAMLError as e:
            raise ConfigError(f"{var}: value is not a YAML scalar: {e}") from e
        path = _set_path(doc, keys, value, var)
        sources[field_path(path)] = var
    return sources


def _set_path(doc: dict[str, Any], keys: list[str], value: Any, var: str) -> list[str | int]:
    node: Any = doc
    path: list[str | int] = []
    for i, key in enumerate(keys):
        if not key:
            raise ConfigError(f"{var}: empty key in the variable name")
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _step_index(node, key, var)
            path.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{var}: {field_path(path)} is not a mapping")
        path.append(key)
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
    return path


def _step_index(items: list[Any], key: str, var: str) -> int:
    if key.isdigit():
        if int(key) < len(items):
            return int(key)
        raise ConfigError(f"{var}: index {key} is out of range (the list has {len(items)} items)")
    wanted = key.replace("-", "_")
    for index, item in enumerate(items):
        if isinstance(item, dict) and str(item.get("name", "")).lower().replace("-", "_") == wanted:
            return index
    raise ConfigError(f"{var}: no step named {key!r}")


def _validate(doc: dict[str, Any], sources: dict[str, str]) -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        lines = []
        for error in errors:
            where = field_path(error.absolute_path)
            origin = f" (from {sources[where]})" if where in sources else ""
            step_kind = error.validator == "oneOf" and list(error.absolute_path)[:1] == ["steps"]
            message = _step_kind_message(error.instance) if step_kind else error.message
            lines.append(f"{where}: {message}{origin}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    names = [step["name"] for step in doc["steps"]]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"steps[{index}].name: {name!r} is used by an earlier step")
    if len({n.replace("-", "_") for n in names}) != len(names):
        raise ConfigError(
            "steps: two step names differ only in '-' versus '_'; env overrides could not tell them apart"
        )


def _step_kind_message(step: Any) -> str:
    """Why a step is neither a handler step nor a runtime step (the schema's ``oneOf`` says only "not valid")."""
    if not isinstance(step, dict):
        return "must be a mapping"
    if "handler" in step and "runtime" in step:
        return "a step has either a handler or a runtime, not both"
    if "model" in step and "runtime" not in step:
        return "model names the file of a runtime step: add runtime (onnx, torch, sklearn, xgboost or lightgbm)"
    return "needs a handler ('package.module:ClassName') or a runtime (onnx, torch, sklearn, xgboost or lightgbm)"


def _tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in items)


def _step(index: int, step: dict[str, Any], environ: Mapping[str, str]) -> StepSettings:
    """A step's settings; a runtime step without ``model`` serves ``MODEL_PATH`` (set by the operator)."""
    if "runtime" in step and "model" not in step:
        if not environ.get(MODEL_PATH_ENV):
            raise ConfigError(
                f"steps[{index}].model: runtime step {step['name']!r} needs a model file (or {MODEL_PATH_ENV} "
                "in the environment)"
            )
        step = {**step, "model": environ[MODEL_PATH_ENV]}
    return StepSettings(**step)


def _to_settings(doc: dict[str, Any], environ: Mapping[str, str]) -> Settings:
    steps = tuple(_step(index, step, environ) for index, step in enumerate(doc["steps"]))
    server = ServerSettings(**doc.get("server", {}))
    top = {k: v for k, v in doc.items() if k not in ("version", "steps", "server", "inputs", "outputs")}
    return Settings(
        steps=steps,
        server=server,
        inputs=_tensors(doc.get("inputs", [])),
        outputs=_tensors(doc.get("outputs", [])),
        **top,
    )
