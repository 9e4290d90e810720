"""Typed ``Pipeline`` spec: parsing, defaults and the semantic checks the CRD schema cannot express.

The API server already enforces the CRD's openAPIV3Schema (types, minimums, enums, CEL rules), but the
operator re-checks what it relies on: objects may come from an older CRD, from a server that skips
validation (tests), or combine fields in ways no schema rule catches. Every problem is an
:class:`InvalidSpec` naming the offending field, e.g. ``spec.steps[1].handler``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aqueduct_operator import policy as policies
from aqueduct_operator.images import RUNTIMES, runtime_image
from aqueduct_operator.policy import NetworkAccess, Policy, Violation
from aqueduct_operator.storage import (
    DNS1123_LABEL_RE,
    MODEL_PATH_ENV,
    Model,
    StorageError,
    parse_model,
    parse_volume_mounts,
    parse_volumes,
)

# Same patterns as the CRD and config.schema.json (tests/contract checks all three agree).
STEP_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$")
IMPORT_REF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
# The Pipeline's name becomes a Service name and a label value: a DNS-1035 label.
DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY_RE = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
GPU_RESOURCE = "nvidia.com/gpu"
DATATYPES = frozenset(
    ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
)
#: The pod's HTTP port, and its gRPC port unless ``spec.server.grpcPort`` says another.
HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Environment variables the operator sets itself; a user value would break the pod's contract.
RESERVED_ENV = frozenset({"AQUEDUCT_CONFIG"})

SPEC_FIELDS = frozenset(
    {
        "image",
        "imagePullPolicy",
        "replicas",
        "steps",
        "queue",
        "timeout",
        "startTimeout",
        "inputs",
        "outputs",
        "server",
        "resources",
        "env",
        "nodeSelector",
        "tolerations",
        "imagePullSecrets",
        "serviceAccountName",
        "podAnnotations",
        "model",
        "volumes",
        "volumeMounts",
        "autoscaling",
        "disruption",
        "topologySpreadConstraints",
        "monitoring",
        "batchDim",
        "networkPolicy",
    }
)
STEP_FIELDS = frozenset(
    {"name", "handler", "runtime", "model", "nprocs", "batchSize", "batchTimeout", "latencyTarget", "handleCondition",
     "options", "gpus"}
)
# What GPUs a step's workers see: all of the pod's, or one each (worker i: GPU i mod G).
GPU_PLACEMENTS = ("all", "per_worker")
# Handler options are keyword arguments of the handler's constructor.
OPTION_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
AUTOSCALING_FIELDS = frozenset(
    {"engine", "minReplicas", "maxReplicas", "metric", "target", "scaleDownStabilizationSeconds", "prometheus", "query"}
)
ENGINES = ("hpa", "keda")
# What an autoscaler can follow: the pods' queue depth or in-flight requests (Prometheus), or CPU.
METRICS = ("queueDepth", "inFlight", "cpu")
# spec.autoscaling.target of metric cpu when unset: a percentage of the CPU request (kubectl autoscale's default).
DEFAULT_CPU_TARGET = 80
TOPOLOGY_FIELDS = frozenset(
    {"maxSkew", "topologyKey", "whenUnsatisfiable", "labelSelector", "minDomains", "matchLabelKeys",
     "nodeAffinityPolicy", "nodeTaintsPolicy"}
)
PERCENT_RE = re.compile(r"^[0-9]+%$")


class InvalidSpec(ValueError):
    """The Pipeline cannot be served as written; ``field`` names the offending path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Step:
    """One step: a handler class (``handler``), or a built-in runtime serving a model file (``runtime``, ``model``)."""

    name: str
    handler: str | None = None
    runtime: str | None = None
    model: str | None = None  # None until parse() fills it in from spec.model
    nprocs: int = 1
    batch_size: int = 1
    batch_timeout: float = 0.0
    latency_target: float | None = None
    handle_condition: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    gpus: str = "all"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Autoscaling:
    """``spec.autoscaling``: the autoscaler owns the Deployment's replica count within [min, max]."""

    engine: str
    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    scale_down_stabilization_seconds: int = 300
    prometheus: str | None = None  # KEDA: the Prometheus server its trigger queries
    query: str | None = None  # KEDA: PromQL replacing the default query of the metric


@dataclass(frozen=True)
class Monitoring:
    """``spec.monitoring``: prometheus-operator objects (PodMonitor, objectives PrometheusRule) and the p99 target."""

    prometheus_operator: bool = False
    latency_target: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSpec:
    """A validated ``Pipeline``: its identity plus its spec with defaults applied."""

    name: str
    namespace: str
    uid: str
    generation: int
    image: str
    steps: tuple[Step, ...]
    replicas: int = 1
    image_pull_policy: str | None = None
    queue_size: int | None = None
    queue_priorities: int = 1
    timeout: float = 5.0
    start_timeout: float | None = None
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    log_level: str = "info"
    max_body_bytes: int | None = None
    graceful_timeout: float = 30.0
    workers: int | None = None
    arena_bytes: int | None = None
    shm_bytes: int | None = None
    resources: Mapping[str, Mapping[str, str | int]] = field(default_factory=dict)
    env: tuple[Mapping[str, Any], ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str | None = None
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    model: Model | None = None
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    drain_delay: float = 5.0
    #: The pod's OIP gRPC port (``spec.server.grpcPort``); 0: no gRPC.
    grpc_port: int = DEFAULT_GRPC_PORT
    #: Readiness asked over gRPC (``grpc.health.v1``) instead of HTTP (``spec.server.grpcReadinessProbe``).
    grpc_readiness_probe: bool = False
    autoscaling: Autoscaling | None = None
    min_available: int | str | None = None
    topology_spread: tuple[Mapping[str, Any], ...] = ()
    monitoring: Monitoring = field(default_factory=Monitoring)
    batch_dim: bool | None = None
    network_policy: NetworkAccess = NetworkAccess()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(value: Any, path: str, *, lo: int, hi: int | None = None) -> int:
    if not _is_int(value):
        raise InvalidSpec(path, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise InvalidSpec(path, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return int(value)


def _number(value: Any, path: str, *, lo: float, hi: float | None = None, exclusive_lo: bool = False) -> float:
    if not _is_number(value):
        raise InvalidSpec(path, f"must be a number, got {value!r}")
    if value < lo or (exclusive_lo and value == lo) or (hi is not None and value > hi):
        bound = f"> {lo}" if exclusive_lo else f">= {lo}"
        raise InvalidSpec(path, f"must be {bound}" + (f" and <= {hi}" if hi is not None else "") + f", got {value}")
    return float(value)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSpec(path, f"must be a non-empty string, got {value!r}")
    return value


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidSpec(path, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidSpec(path, f"must be a list, got {type(value).__name__}")
    return value


def _string_map(value: Any, path: str) -> dict[str, str]:
    result = {}
    for key, item in _mapping(value, path).items():
        if not isinstance(item, str):
            raise InvalidSpec(f"{path}.{key}", f"must be a string, got {item!r}")
        result[str(key)] = item
    return result


def _unknown(obj: Mapping[str, Any], known: frozenset[str], path: str) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise InvalidSpec(f"{path}.{extra[0]}", f"unknown field (known: {', '.join(sorted(known))})")


def _import_ref(value: Any, path: str, what: str) -> str:
    text = _str(value, path)
    if not IMPORT_REF_RE.match(text):
        raise InvalidSpec(path, f"must be {what} as 'package.module:{what.split(':')[-1]}', got {text!r}")
    return text


def _options(raw: Any, path: str) -> dict[str, Any]:
    options = dict(_mapping(raw, path))
    for key in options:
        if not OPTION_NAME_RE.match(str(key)):
            raise InvalidSpec(f"{path}.{key}", "option names are keyword arguments: letters, digits and '_'")
    return options


def _step(raw: Any, path: str) -> Step:
    obj = _mapping(raw, path)
    _unknown(obj, STEP_FIELDS, path)
    if "name" not in obj:
        raise InvalidSpec(f"{path}.name", "is required")
    if ("handler" in obj) == ("runtime" in obj):
        raise InvalidSpec(f"{path}.handler", "a step needs exactly one of handler (a Python class) and runtime "
                          f"(one of {', '.join(RUNTIMES)}, serving a model file)")
    runtime = obj.get("runtime")
    if runtime is not None and runtime not in RUNTIMES:
        raise InvalidSpec(f"{path}.runtime", f"must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if "model" in obj and runtime is None:
        raise InvalidSpec(f"{path}.model", "is only used with runtime (a handler reads its files from its options)")
    model = None if obj.get("model") is None else _str(obj["model"], f"{path}.model")
    if model is not None and not model.startswith("/"):
        raise InvalidSpec(f"{path}.model", f"must be an absolute path in the serving container, got {model!r}")
    name = _str(obj["name"], f"{path}.name")
    if len(name) > 63 or not STEP_NAME_RE.match(name):
        raise InvalidSpec(f"{path}.name", f"must match {STEP_NAME_RE.pattern} (at most 63 characters), got {name!r}")
    condition = obj.get("handleCondition")
    latency = obj.get("latencyTarget")
    gpus = obj.get("gpus", "all")
    if gpus not in GPU_PLACEMENTS:
        raise InvalidSpec(f"{path}.gpus", f"must be one of {', '.join(GPU_PLACEMENTS)}, got {gpus!r}")
    return Step(
        name=name,
        handler=None if runtime else _import_ref(obj["handler"], f"{path}.handler", "a handler class:ClassName"),
        runtime=runtime,
        model=model,
        nprocs=_int(obj.get("nprocs", 1), f"{path}.nprocs", lo=1, hi=64),
        batch_size=_int(obj.get("batchSize", 1), f"{path}.batchSize", lo=1, hi=4096),
        batch_timeout=_number(obj.get("batchTimeout", 0), f"{path}.batchTimeout", lo=0, hi=60),
        latency_target=None
        if latency is None
        else _number(latency, f"{path}.latencyTarget", lo=0, hi=60, exclusive_lo=True),
        handle_condition=None
        if condition is None
        else _import_ref(condition, f"{path}.handleCondition", "a condition function:function"),
        options=_options(obj.get("options") or {}, f"{path}.options"),
        gpus=gpus,
    )


def _tensor(raw: Any, path: str) -> Tensor:
    obj = _mapping(raw, path)
    _unknown(obj, frozenset({"name", "datatype", "shape"}), path)
    datatype = obj.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidSpec(f"{path}.datatype", f"must be one of {', '.join(sorted(DATATYPES))}, got {datatype!r}")
    shape = _list(obj.get("shape"), f"{path}.shape")
    return Tensor(
        name=_str(obj.get("name"), f"{path}.name"),
        datatype=datatype,
        shape=tuple(_int(dim, f"{path}.shape[{i}]", lo=-1) for i, dim in enumerate(shape)),
    )


def _quantity(value: Any, path: str) -> str | int:
    if _is_int(value):
        return int(value)
    if isinstance(value, str) and QUANTITY_RE.match(value):
        return value
    raise InvalidSpec(path, f"must be a Kubernetes quantity such as '500m', '2Gi' or 1, got {value!r}")


def _resources(raw: Any, path: str) -> dict[str, dict[str, str | int]]:
    obj = _mapping(raw, path)
    _unknown(obj, frozenset({"limits", "requests"}), path)
    result: dict[str, dict[str, str | int]] = {}
    for kind in ("limits", "requests"):
        if kind in obj:
            result[kind] = {
                str(key): _quantity(value, f"{path}.{kind}.{key}")
                for key, value in _mapping(obj[kind], f"{path}.{kind}").items()
            }
    gpu_limit = result.get("limits", {}).get(GPU_RESOURCE)
    gpu_request = result.get("requests", {}).get(GPU_RESOURCE)
    for kind, value in (("limits", gpu_limit), ("requests", gpu_request)):
        if value is not None and not (_is_int(value) or (isinstance(value, str) and value.isdigit())):
            raise InvalidSpec(f"{path}.{kind}.{GPU_RESOURCE}", f"GPUs are whole devices: use an integer, got {value!r}")
    if gpu_request is not None and gpu_limit is None:
        raise InvalidSpec(f"{path}.limits.{GPU_RESOURCE}", "GPUs must be set in limits (requests alone are rejected)")
    if gpu_request is not None and str(gpu_request) != str(gpu_limit):
        raise InvalidSpec(f"{path}.requests.{GPU_RESOURCE}", "must equal the GPU limit (GPUs cannot be overcommitted)")
    return result


def _env(raw: Any, path: str) -> tuple[Mapping[str, Any], ...]:
    seen: set[str] = set()
    result = []
    for i, item in enumerate(_list(raw, path)):
        where = f"{path}[{i}]"
        obj = _mapping(item, where)
        _unknown(obj, frozenset({"name", "value", "valueFrom"}), where)
        name = _str(obj.get("name"), f"{where}.name")
        if not ENV_NAME_RE.match(name):
            raise InvalidSpec(f"{where}.name", f"not a valid environment variable name: {name!r}")
        if name in RESERVED_ENV:
            raise InvalidSpec(f"{where}.name", f"{name} is set by the operator")
        if name in seen:
            raise InvalidSpec(f"{where}.name", f"duplicate environment variable {name!r}")
        seen.add(name)
        if "value" in obj and "valueFrom" in obj:
            raise InvalidSpec(where, "value and valueFrom are mutually exclusive")
        if "value" in obj and not isinstance(obj["value"], str):
            raise InvalidSpec(f"{where}.value", f"must be a string, got {obj['value']!r}")
        if "valueFrom" in obj:
            _mapping(obj["valueFrom"], f"{where}.valueFrom")
        result.append(dict(obj))
    return tuple(result)


def _tolerations(raw: Any, path: str) -> tuple[Mapping[str, Any], ...]:
    known = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})
    result = []
    for i, item in enumerate(_list(raw, path)):
        where = f"{path}[{i}]"
        obj = _mapping(item, where)
        _unknown(obj, known, where)
        if obj.get("operator", "Equal") not in TOLERATION_OPERATORS:
            raise InvalidSpec(f"{where}.operator", f"must be Exists or Equal, got {obj['operator']!r}")
        if "effect" in obj and obj["effect"] not in TOLERATION_EFFECTS:
            raise InvalidSpec(f"{where}.effect", f"must be one of {', '.join(TOLERATION_EFFECTS)}")
        if obj.get("operator") == "Exists" and obj.get("value"):
            raise InvalidSpec(f"{where}.value", "must be empty when operator is Exists")
        if "tolerationSeconds" in obj:
            _int(obj["tolerationSeconds"], f"{where}.tolerationSeconds", lo=-(2**63))
        result.append(dict(obj))
    return tuple(result)


def default_target(metric: str, steps: tuple[Step, ...]) -> float:
    """``spec.autoscaling.target`` when unset, per pod: queueDepth, one full batch waiting for each worker of the
    first step (its batchSize x nprocs); inFlight, twice that (one batch being handled, one waiting); cpu, 80 %."""
    if metric == "cpu":
        return float(DEFAULT_CPU_TARGET)
    first = steps[0]
    per_worker_batches = 1 if metric == "queueDepth" else 2
    return float(first.batch_size * first.nprocs * per_worker_batches)


def _autoscaling(raw: Any, path: str, spec: Mapping[str, Any], steps: tuple[Step, ...]) -> Autoscaling:
    obj = _mapping(raw, path)
    _unknown(obj, AUTOSCALING_FIELDS, path)
    engine = obj.get("engine", "hpa")
    if engine not in ENGINES:
        raise InvalidSpec(f"{path}.engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    metric = obj.get("metric", "queueDepth")
    if metric not in METRICS:
        raise InvalidSpec(f"{path}.metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    if "maxReplicas" not in obj:
        raise InvalidSpec(f"{path}.maxReplicas", "is required")
    max_replicas = _int(obj["maxReplicas"], f"{path}.maxReplicas", lo=1, hi=1000)
    min_replicas = _int(obj.get("minReplicas", 1), f"{path}.minReplicas", lo=0, hi=1000)
    if min_replicas > max_replicas:
        raise InvalidSpec(f"{path}.minReplicas", f"{min_replicas} is more than maxReplicas ({max_replicas})")
    if min_replicas == 0 and engine != "keda":
        raise InvalidSpec(f"{path}.minReplicas", "0 needs engine: keda (a HorizontalPodAutoscaler keeps one pod)")
    if min_replicas == 0 and metric == "cpu":
        raise InvalidSpec(f"{path}.minReplicas", "0 needs a Prometheus metric: no pod, no CPU to scale up from")
    if obj.get("target") is None:
        target = default_target(metric, steps)
    elif metric == "cpu":
        target = float(_int(obj["target"], f"{path}.target", lo=1, hi=1000))
    else:
        target = _number(obj["target"], f"{path}.target", lo=0, hi=1e6, exclusive_lo=True)
    if metric == "cpu":
        requests = _mapping((spec.get("resources") or {}).get("requests") or {}, "spec.resources.requests")
        if "cpu" not in requests:
            raise InvalidSpec("spec.resources.requests.cpu", "is required with autoscaling.metric cpu "
                              "(the target is a percentage of it)")
    prometheus = obj.get("prometheus")
    query = obj.get("query")
    if engine == "keda" and metric != "cpu" and prometheus is None:
        raise InvalidSpec(f"{path}.prometheus", "is required with engine keda: the URL of the Prometheus to query")
    if engine != "keda":
        for key in ("prometheus", "query"):
            if obj.get(key) is not None:
                raise InvalidSpec(f"{path}.{key}", "is only used with engine keda")
    return Autoscaling(
        engine=engine,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        metric=metric,
        target=target,
        scale_down_stabilization_seconds=_int(
            obj.get("scaleDownStabilizationSeconds", 300), f"{path}.scaleDownStabilizationSeconds", lo=0, hi=3600
        ),
        prometheus=None if prometheus is None else _str(prometheus, f"{path}.prometheus"),
        query=None if query is None else _str(query, f"{path}.query"),
    )


def _min_available(raw: Any, path: str) -> int | str:
    if _is_int(raw) and raw >= 0:
        return int(raw)
    if isinstance(raw, str) and PERCENT_RE.match(raw) and int(raw[:-1]) <= 100:
        return raw
    raise InvalidSpec(path, f"must be a number of pods or a percentage such as '50%', got {raw!r}")


def _topology_spread(raw: Any, path: str) -> tuple[Mapping[str, Any], ...]:
    result = []
    for i, item in enumerate(_list(raw, path)):
        where = f"{path}[{i}]"
        obj = _mapping(item, where)
        _unknown(obj, TOPOLOGY_FIELDS, where)
        _int(obj.get("maxSkew"), f"{where}.maxSkew", lo=1)
        _str(obj.get("topologyKey"), f"{where}.topologyKey")
        if obj.get("whenUnsatisfiable") not in ("DoNotSchedule", "ScheduleAnyway"):
            raise InvalidSpec(f"{where}.whenUnsatisfiable", "must be DoNotSchedule or ScheduleAnyway")
        result.append(dict(obj))
    return tuple(result)


def _monitoring(raw: Any, path: str) -> Monitoring:
    obj = _mapping(raw, path)
    _unknown(obj, frozenset({"prometheusOperator", "latencyTarget", "labels"}), path)
    enabled = obj.get("prometheusOperator", False)
    if not isinstance(enabled, bool):
        raise InvalidSpec(f"{path}.prometheusOperator", f"must be true or false, got {enabled!r}")
    latency = obj.get("latencyTarget")
    return Monitoring(
        prometheus_operator=enabled,
        latency_target=None
        if latency is None
        else _number(latency, f"{path}.latencyTarget", lo=0, hi=3600, exclusive_lo=True),
        labels=_string_map(obj.get("labels") or {}, f"{path}.labels"),
    )


def _namespaces(raw: Any, path: str) -> tuple[str, ...]:
    names = [_str(item, f"{path}[{i}]") for i, item in enumerate(_list(raw, path))]
    for i, name in enumerate(names):
        if len(name) > 63 or not DNS1123_LABEL_RE.match(name):
            raise InvalidSpec(f"{path}[{i}]", f"must be a namespace's name, got {name!r}")
    return tuple(sorted(set(names)))


def _network_policy(raw: Any, path: str, default: NetworkAccess) -> NetworkAccess:
    """``spec.networkPolicy``; each field left out keeps the operator's default (chart pipelinePolicy)."""
    obj = _mapping(raw, path)
    _unknown(obj, frozenset({"enabled", "ingressNamespaces", "metricsNamespaces"}), path)
    enabled = obj.get("enabled", default.enabled)
    if not isinstance(enabled, bool):
        raise InvalidSpec(f"{path}.enabled", f"must be true or false, got {enabled!r}")
    return NetworkAccess(
        enabled=enabled,
        ingress_namespaces=default.ingress_namespaces
        if obj.get("ingressNamespaces") is None
        else _namespaces(obj["ingressNamespaces"], f"{path}.ingressNamespaces"),
        metrics_namespaces=default.metrics_namespaces
        if obj.get("metricsNamespaces") is None
        else _namespaces(obj["metricsNamespaces"], f"{path}.metricsNamespaces"),
    )


def _image(
    spec: Mapping[str, Any], steps: tuple[Step, ...], default_image: str | None, runtime_images: Mapping[str, str]
) -> str:
    """``spec.image``; else the image of the steps' runtime; else (handlers only) the operator's image."""
    if "image" in spec:
        return _str(spec["image"], "spec.image")
    runtimes = tuple(dict.fromkeys(step.runtime for step in steps if step.runtime))
    if not runtimes:
        if not default_image:
            raise InvalidSpec("spec.image", "is required (the operator has no default image)")
        return default_image
    images = {runtime: runtime_image(runtime, default_image, runtime_images) for runtime in runtimes}
    for runtime, image in images.items():
        if image is None:
            raise InvalidSpec("spec.image", f"is required: the operator has no image for runtime {runtime} "
                                            f"(chart value runtimeImages.{runtime})")
    distinct = sorted({str(image) for image in images.values()})
    if len(distinct) > 1:
        raise InvalidSpec("spec.image", f"is required: the steps use runtimes {', '.join(runtimes)}, which different "
                                        f"images serve ({', '.join(distinct)}); name one that holds all of them")
    return distinct[0]


def _step_models(steps: tuple[Step, ...], model: Model | None) -> tuple[Step, ...]:
    """Runtime steps without ``model`` serve ``spec.model`` (the path the pod gets as MODEL_PATH)."""
    result = []
    for i, step in enumerate(steps):
        if step.runtime and step.model is None:
            if model is None:
                raise InvalidSpec(f"spec.steps[{i}].model", "is required with runtime, unless spec.model "
                                                            "(storageUri) gives the model file")
            step = replace(step, model=model.path)
        result.append(step)
    return tuple(result)


def parse(
    body: Mapping[str, Any],
    default_image: str | None = None,
    runtime_images: Mapping[str, str] | None = None,
    policy: Policy | None = None,
) -> PipelineSpec:
    """Validate a ``Pipeline`` object (as the API returns it) into a :class:`PipelineSpec`.

    Without ``spec.image``, a Pipeline with runtime steps runs its runtime's image (``runtime_images``, by
    runtime name; one not given is derived from ``default_image``, see :mod:`aqueduct_operator.images`),
    and a Pipeline of handlers only runs ``default_image`` (the operator passes its own image).

    ``policy`` (default: :class:`~aqueduct_operator.policy.Policy`'s defaults) says which volumes, service
    accounts and Secrets the Pipeline may use, and gives the requests, limits and network policy it leaves out.

    Raises:
        InvalidSpec: naming the first offending field.
    """
    meta = _mapping(body.get("metadata") or {}, "metadata")
    name = str(meta.get("name", ""))
    if len(name) > 63 or not DNS1035_RE.match(name):
        raise InvalidSpec(
            "metadata.name",
            f"must be a DNS-1035 label (lowercase letters, digits, '-'; starts with a letter; "
            f"at most 63 characters) because it names the Service, got {name!r}",
        )
    spec = _mapping(body.get("spec"), "spec") if "spec" in body else None
    if spec is None:
        raise InvalidSpec("spec", "is required")
    _unknown(spec, SPEC_FIELDS, "spec")
    if "steps" not in spec:
        raise InvalidSpec("spec.steps", "is required")

    raw_steps = _list(spec["steps"], "spec.steps")
    if not 1 <= len(raw_steps) <= 32:
        raise InvalidSpec("spec.steps", f"must have 1 to 32 steps, got {len(raw_steps)}")
    steps = tuple(_step(raw, f"spec.steps[{i}]") for i, raw in enumerate(raw_steps))
    names = [step.name for step in steps]
    for i, step_name in enumerate(names):
        if step_name in names[:i]:
            raise InvalidSpec(f"spec.steps[{i}].name", f"duplicate step name {step_name!r}: step names must be unique")

    queue = _mapping(spec.get("queue") or {}, "spec.queue")
    _unknown(queue, frozenset({"size", "priorities"}), "spec.queue")
    server = _mapping(spec.get("server") or {}, "spec.server")
    _unknown(
        server,
        frozenset(
            {"logLevel", "maxBodyBytes", "gracefulTimeout", "workers", "arenaBytes", "drainDelay", "shmBytes"}
            | {"grpcPort", "grpcReadinessProbe"}
        ),
        "spec.server",
    )
    log_level = server.get("logLevel", "info")
    if log_level not in LOG_LEVELS:
        raise InvalidSpec("spec.server.logLevel", f"must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    grpc_port = _int(server.get("grpcPort", DEFAULT_GRPC_PORT), "spec.server.grpcPort", lo=0, hi=65535)
    if grpc_port == HTTP_PORT:
        raise InvalidSpec("spec.server.grpcPort", f"must differ from the HTTP port, {HTTP_PORT}")
    grpc_readiness_probe = server.get("grpcReadinessProbe", False)
    if not isinstance(grpc_readiness_probe, bool):
        raise InvalidSpec("spec.server.grpcReadinessProbe", f"must be true or false, got {grpc_readiness_probe!r}")
    if grpc_readiness_probe and not grpc_port:
        raise InvalidSpec("spec.server.grpcReadinessProbe", "needs gRPC served: spec.server.grpcPort is 0")
    pull_policy = spec.get("imagePullPolicy")
    if pull_policy is not None and pull_policy not in PULL_POLICIES:
        raise InvalidSpec("spec.imagePullPolicy", f"must be one of {', '.join(PULL_POLICIES)}, got {pull_policy!r}")

    timeout = _number(spec.get("timeout", 5.0), "spec.timeout", lo=0, exclusive_lo=True)
    for i, step in enumerate(steps):
        if step.batch_timeout >= timeout:
            raise InvalidSpec(
                f"spec.steps[{i}].batchTimeout",
                f"{step.batch_timeout}s must be shorter than spec.timeout ({timeout}s), "
                "or every request waiting for a fuller batch would time out",
            )
    start_timeout = spec.get("startTimeout")
    pull_secrets = []
    for i, secret in enumerate(_list(spec.get("imagePullSecrets", []), "spec.imagePullSecrets")):
        secret_ref = _mapping(secret, f"spec.imagePullSecrets[{i}]")
        _unknown(secret_ref, frozenset({"name"}), f"spec.imagePullSecrets[{i}]")
        pull_secrets.append(_str(secret_ref.get("name"), f"spec.imagePullSecrets[{i}].name"))
    service_account = spec.get("serviceAccountName")
    try:
        model = None if spec.get("model") is None else parse_model(spec["model"])
        volumes = parse_volumes(spec.get("volumes", []))
        volume_mounts = parse_volume_mounts(spec.get("volumeMounts", []), volumes)
    except StorageError as e:
        raise InvalidSpec(f"spec.{e.field}", e.message) from None
    env = _env(spec.get("env", []), "spec.env")
    if model is not None:
        for i, item in enumerate(env):
            if item["name"] == MODEL_PATH_ENV:
                raise InvalidSpec(f"spec.env[{i}].name", f"{MODEL_PATH_ENV} is set by the operator from spec.model")
    policy = policy or Policy()
    try:
        policies.check(
            policy,
            volumes=volumes,
            env=env,
            service_account=None if service_account is None else _str(service_account, "spec.serviceAccountName"),
            s3_secret=None if model is None else model.s3.secret_name,
        )
    except Violation as e:
        raise InvalidSpec(f"spec.{e.field}", e.message) from None
    steps = _step_models(steps, model)
    batch_dim = spec.get("batchDim")
    if batch_dim is not None and not isinstance(batch_dim, bool):
        raise InvalidSpec("spec.batchDim", f"must be true or false, got {batch_dim!r}")
    disruption = _mapping(spec.get("disruption") or {}, "spec.disruption")
    _unknown(disruption, frozenset({"minAvailable"}), "spec.disruption")

    return PipelineSpec(
        name=name,
        namespace=str(meta.get("namespace") or "default"),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        image=_image(spec, steps, default_image, runtime_images or {}),
        image_pull_policy=pull_policy,
        steps=steps,
        replicas=_int(spec.get("replicas", 1), "spec.replicas", lo=0, hi=1000),
        queue_size=None if queue.get("size") is None else _int(queue["size"], "spec.queue.size", lo=1),
        queue_priorities=_int(queue.get("priorities", 1), "spec.queue.priorities", lo=1, hi=16),
        timeout=timeout,
        start_timeout=None
        if start_timeout is None
        else _number(start_timeout, "spec.startTimeout", lo=0, exclusive_lo=True),
        inputs=tuple(
            _tensor(t, f"spec.inputs[{i}]") for i, t in enumerate(_list(spec.get("inputs", []), "spec.inputs"))
        ),
        outputs=tuple(
            _tensor(t, f"spec.outputs[{i}]") for i, t in enumerate(_list(spec.get("outputs", []), "spec.outputs"))
        ),
        log_level=log_level,
        max_body_bytes=None
        if server.get("maxBodyBytes") is None
        else _int(server["maxBodyBytes"], "spec.server.maxBodyBytes", lo=1024),
        graceful_timeout=_number(server.get("gracefulTimeout", 30), "spec.server.gracefulTimeout", lo=0, hi=3600),
        workers=None if server.get("workers") is None else _int(server["workers"], "spec.server.workers", lo=1, hi=256),
        arena_bytes=None
        if server.get("arenaBytes") is None
        else _int(server["arenaBytes"], "spec.server.arenaBytes", lo=0),
        shm_bytes=None
        if server.get("shmBytes") is None
        else _int(server["shmBytes"], "spec.server.shmBytes", lo=1024 * 1024),
        resources=policies.with_default_resources(
            _resources(spec.get("resources") or {}, "spec.resources"), policy.resources
        ),
        env=env,
        node_selector=_string_map(spec.get("nodeSelector") or {}, "spec.nodeSelector"),
        tolerations=_tolerations(spec.get("tolerations", []), "spec.tolerations"),
        image_pull_secrets=tuple(pull_secrets),
        service_account_name=None if service_account is None else _str(service_account, "spec.serviceAccountName"),
        pod_annotations=_string_map(spec.get("podAnnotations") or {}, "spec.podAnnotations"),
        model=model,
        volumes=volumes,
        volume_mounts=volume_mounts,
        drain_delay=_number(server.get("drainDelay", 5), "spec.server.drainDelay", lo=0, hi=300),
        grpc_port=grpc_port,
        grpc_readiness_probe=grpc_readiness_probe,
        autoscaling=None
        if spec.get("autoscaling") is None
        else _autoscaling(spec["autoscaling"], "spec.autoscaling", spec, steps),
        min_available=None
        if disruption.get("minAvailable") is None
        else _min_available(disruption["minAvailable"], "spec.disruption.minAvailable"),
        topology_spread=_topology_spread(spec.get("topologySpreadConstraints", []), "spec.topologySpreadConstraints"),
        monitoring=_monitoring(spec.get("monitoring") or {}, "spec.monitoring"),
        batch_dim=batch_dim,
        network_policy=_network_policy(spec.get("networkPolicy") or {}, "spec.networkPolicy", policy.network_policy),
    )
