"""Pure rendering: a ``Pipeline`` -> the ConfigMap, Deployment and Service that serve it, plus the optional
children: an autoscaler (HorizontalPodAutoscaler or KEDA ScaledObject), a PodDisruptionBudget, the
prometheus-operator PodMonitor and objectives PrometheusRule, and a NetworkPolicy.

No I/O and no clock: the same Pipeline always renders the same objects, byte for byte, which is what
makes reconciliation idempotent and lets unit tests call :func:`desired_objects` directly.

The serving pod reads one file, ``/etc/aqueduct/config.yaml`` (format: the serving pod's
``config.schema.json``); every batching setting is injected there, nothing through the environment.
The file's sha256 is a pod-template annotation, so changing e.g. ``batchSize`` rolls the pods.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import yaml

from aqueduct_operator import API_VERSION, KIND, storage
from aqueduct_operator.policy import Policy, quantity
from aqueduct_operator.spec import HTTP_PORT, Autoscaling, PipelineSpec, Step, Tensor, parse

CONFIG_DIR = "/etc/aqueduct"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
CONTAINER = "serve"
RUN_AS = 10001
# Seconds the pod gets beyond the preStop pause and the server's graceful timeout: worker joins, exit.
GRACE_MARGIN = 15
DEFAULT_START_TIMEOUT = 300.0
STARTUP_PERIOD = 2

CHECKSUM_ANNOTATION = "checksum/config"
# On the Deployment when an autoscaler owns spec.replicas: the operator then never writes it after creation.
REPLICAS_ANNOTATION = "aqueduct.dev/replicas-owner"
AUTOSCALER = "autoscaler"
# The engine's queue size when spec.queue.size is unset (aqueduct.flow.DEFAULT_QUEUE_SIZE; tests/contract checks).
ENGINE_QUEUE_SIZE = 1024
# The pods' series each Prometheus metric of spec.autoscaling.metric reads (summed over steps, per pod).
METRIC_SERIES = {"queueDepth": "aqueduct_queue_depth", "inFlight": "aqueduct_http_requests_in_flight"}
# Recording rules of the objectives PrometheusRule, read by the chart's alerts.
QUEUE_CAPACITY_RECORD = "aqueduct:pipeline_queue_capacity"
LATENCY_TARGET_RECORD = "aqueduct:pipeline_latency_target_seconds"
PIPELINE_LABEL = "aqueduct.dev/pipeline"
MANAGED_BY = "aqueduct-operator"
# The serving pod's defaults (service/aqueduct_service/settings.py; tests/contract checks): each front end's
# arena, the largest request body, the bodies it decodes at once, and the most front ends it starts by itself.
POD_ARENA_BYTES = 32 * 1024 * 1024
POD_MAX_BODY_BYTES = 64 * 1024 * 1024
POD_DECODE_BUDGET_BYTES = 128 * 1024 * 1024
POD_MAX_FRONT_ENDS = 8
# A model worker's output arena (aqueduct/_runtime/worker.py OUTPUT_ARENA_BYTES; tests/contract checks).
OUTPUT_ARENA_BYTES = 32 * 1024 * 1024
MIB = 1024 * 1024


def config_name(name: str) -> str:
    return f"{name}-config"


def selector_labels(spec: PipelineSpec) -> dict[str, str]:
    """Labels that select the Pipeline's pods (immutable in the Deployment: keep them stable)."""
    return {PIPELINE_LABEL: spec.name}


def labels(spec: PipelineSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "aqueduct",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": "serving",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(spec),
    }


def selector_string(spec: PipelineSpec) -> str:
    """The label selector as a string, for the scale subresource (``status.selector``)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(spec).items()))


def url(spec: PipelineSpec) -> str:
    """In-cluster inference endpoint of the Pipeline."""
    return f"http://{spec.name}.{spec.namespace}.svc.cluster.local:{HTTP_PORT}/v2/models/{spec.name}"


def owner_reference(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(spec: PipelineSpec, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": spec.namespace,
        "labels": labels(spec),
        "ownerReferences": [owner_reference(spec)],
    }


def _tensor(tensor: Tensor) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _number(value: float) -> int | float:
    """Whole floats as ints, so the YAML reads ``timeout: 5`` rather than ``5.0``."""
    return int(value) if float(value).is_integer() else value


def _step(step: Step) -> dict[str, Any]:
    what = {"handler": step.handler} if step.runtime is None else {"runtime": step.runtime, "model": step.model}
    config: dict[str, Any] = {
        "name": step.name,
        **what,
        "nprocs": step.nprocs,
        "batch_size": step.batch_size,
        "batch_timeout": _number(step.batch_timeout),
        "latency_target": None if step.latency_target is None else _number(step.latency_target),
        "handle_condition": step.handle_condition,
    }
    if step.options:  # only when set: Pipelines without options keep their config (and pods) unchanged
        config["options"] = dict(step.options)
    if step.gpus != "all":  # the same
        config["gpus"] = step.gpus
    return config


def serving_config(spec: PipelineSpec) -> dict[str, Any]:
    """The serving pod's config document (``config.schema.json``, version 1): camelCase -> snake_case."""
    server: dict[str, Any] = {
        "host": "0.0.0.0",
        "port": HTTP_PORT,
        "grpc_port": spec.grpc_port,
        "graceful_timeout": _number(spec.graceful_timeout),
        "log_level": spec.log_level,
    }
    if spec.max_body_bytes is not None:
        server["max_body_bytes"] = spec.max_body_bytes
    if spec.workers is not None:
        server["workers"] = spec.workers
    if spec.arena_bytes is not None:
        server["arena_bytes"] = spec.arena_bytes
    config: dict[str, Any] = {"version": 1, "name": spec.name, "steps": [_step(step) for step in spec.steps]}
    # A runtime pipeline's tensors come from its model unless declared (then the pod checks they agree);
    # a handler pipeline's config keeps its empty lists, so upgrading the operator rolls no pods.
    has_runtime = any(step.runtime for step in spec.steps)
    for key, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        if tensors or not has_runtime:
            config[key] = [_tensor(t) for t in tensors]
    config.update(
        queue_size=spec.queue_size,
        queue_priorities=spec.queue_priorities,
        timeout=_number(spec.timeout),
        start_timeout=None if spec.start_timeout is None else _number(spec.start_timeout),
    )
    if spec.batch_dim is not None:  # only when set: the pod's default (from its models) otherwise
        config["batch_dim"] = spec.batch_dim
    config["server"] = server
    return config


def config_text(spec: PipelineSpec) -> str:
    header = f"# Rendered by {MANAGED_BY} from Pipeline {spec.namespace}/{spec.name}; edits are reverted.\n"
    return header + yaml.safe_dump(serving_config(spec), sort_keys=False, default_flow_style=False)


def config_checksum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def configmap(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, config_name(spec.name)),
        "data": {CONFIG_FILE: config_text(spec)},
    }


def _probe(path: str, *, period: int, failures: int, timeout: int = 2, grpc_port: int = 0) -> dict[str, Any]:
    """An HTTP GET of ``path``; with ``grpc_port``, Kubernetes' gRPC probe (``grpc.health.v1``) instead."""
    action: dict[str, Any] = (
        {"grpc": {"port": grpc_port}} if grpc_port else {"httpGet": {"path": path, "port": "http", "scheme": "HTTP"}}
    )
    return {
        **action,
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
        "successThreshold": 1,
    }


def termination_grace_period(spec: PipelineSpec) -> int:
    return math.ceil(spec.drain_delay) + math.ceil(spec.graceful_timeout) + GRACE_MARGIN


def _scrape_annotations() -> dict[str, str]:
    """The ``prometheus.io/*`` annotations a Prometheus ``kubernetes-pods`` scrape job follows."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT), "prometheus.io/path": "/metrics"}


def _topology_spread(spec: PipelineSpec) -> list[dict[str, Any]]:
    """``spec.topologySpreadConstraints`` as given, counting this Pipeline's pods unless a selector is given."""
    return [
        {**item, "labelSelector": item.get("labelSelector") or {"matchLabels": selector_labels(spec)}}
        for item in spec.topology_spread
    ]


def front_ends(spec: PipelineSpec) -> int:
    """The serving pod's HTTP processes: ``spec.server.workers``, else what the pod picks for its CPU limit
    (1 below 4 CPUs, else half of them, at most 8); without a CPU limit the node decides: assume the most."""
    if spec.workers is not None:
        return spec.workers
    cpu = spec.resources.get("limits", {}).get("cpu")
    if cpu is None:
        return POD_MAX_FRONT_ENDS
    cpus = float(quantity(cpu))
    return 1 if cpus < 4 else min(POD_MAX_FRONT_ENDS, int(cpus // 2))


def shm_size_limit(spec: PipelineSpec) -> str:
    """``sizeLimit`` of the pod's ``/dev/shm``: every front end's arena (one with a single process), a 32 MiB
    output arena per model worker, and room for the segments of requests outside the arenas (a body larger
    than its arena's free space gets a segment of its own while it waits): twice the bodies the pod decodes
    at once, or four of the largest, whichever is more (a flood of large requests peaked at 1.3 times the
    decode budget, see bench/RESULTS.md). Rounded up to MiB.

    The limit caps the tmpfs: a write past it fails (SIGBUS in the writer), so it errs on the large side; the
    memory it allows counts against the container's memory limit, which must be larger. ``spec.server.shmBytes``
    replaces the estimate.
    """
    if spec.shm_bytes is not None:
        return f"{-(-spec.shm_bytes // MIB)}Mi"
    arena = spec.arena_bytes if spec.arena_bytes is not None else POD_ARENA_BYTES
    body = spec.max_body_bytes if spec.max_body_bytes is not None else POD_MAX_BODY_BYTES
    model_workers = sum(step.nprocs for step in spec.steps)
    waiting = 2 * max(POD_DECODE_BUDGET_BYTES, 2 * body)
    total = front_ends(spec) * arena + model_workers * OUTPUT_ARENA_BYTES + waiting
    return f"{-(-total // MIB)}Mi"


def _fetch_resources(spec: PipelineSpec) -> dict[str, dict[str, str | int]]:
    """The model download's requests and limits: the serving container's CPU, memory and ephemeral storage
    (an init container runs alone, so this costs the pod nothing more), never its GPUs."""
    kept = ("cpu", "memory", "ephemeral-storage")
    resources = {kind: {name: value for name, value in values.items() if name in kept}
                 for kind, values in spec.resources.items()}
    return {kind: values for kind, values in resources.items() if values}


def deployment(spec: PipelineSpec, checksum: str) -> dict[str, Any]:
    start_timeout = spec.start_timeout if spec.start_timeout is not None else DEFAULT_START_TIMEOUT
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "args": ["aqueduct-serve", "--config", CONFIG_PATH],
        # A config or model the pod cannot serve exits 2 with one line on stderr: the operator reports it.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
        + ([{"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"}] if spec.grpc_port else []),
        "startupProbe": _probe(
            "/v2/health/ready", period=STARTUP_PERIOD, failures=math.ceil(start_timeout / STARTUP_PERIOD) + 5
        ),
        "readinessProbe": _probe(
            "/v2/health/ready", period=5, failures=3, grpc_port=spec.grpc_port if spec.grpc_readiness_probe else 0
        ),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3, timeout=5),
        # Rolling updates drop nothing: a terminating pod is taken out of the Service's endpoints at once,
        # but proxies and load balancers learn that late; the pause keeps it serving until they have, and
        # only then does SIGTERM stop it taking requests (it finishes those in flight).
        **(
            {"lifecycle": {"preStop": {"exec": {"command": ["sleep", _seconds(spec.drain_delay)]}}}}
            if spec.drain_delay > 0
            else {}
        ),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    env = [dict(item) for item in spec.env]
    if spec.model is not None:
        env.insert(0, {"name": storage.MODEL_PATH_ENV, "value": spec.model.path})
        container["volumeMounts"].append(storage.model_mount())
    container["volumeMounts"] += [dict(mount) for mount in spec.volume_mounts]
    if env:
        container["env"] = env
    if spec.resources:
        container["resources"] = {kind: dict(values) for kind, values in spec.resources.items()}

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_period(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "config", "configMap": {"name": config_name(spec.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size_limit(spec)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.model is not None:
        pod_spec["volumes"].append(storage.model_volume(spec.model))
        if spec.model.fetched:
            pod_spec["initContainers"] = [storage.fetch_container(spec.model, spec.image, container["securityContext"])]
            if spec.image_pull_policy:
                pod_spec["initContainers"][0]["imagePullPolicy"] = spec.image_pull_policy
            fetch_resources = _fetch_resources(spec)
            if fetch_resources:
                pod_spec["initContainers"][0]["resources"] = fetch_resources
    pod_spec["volumes"] += [dict(volume) for volume in spec.volumes]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(item) for item in spec.tolerations]
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]
    if spec.topology_spread:
        pod_spec["topologySpreadConstraints"] = _topology_spread(spec)

    metadata = _metadata(spec, spec.name)
    replicas = spec.replicas
    if spec.autoscaling is not None:
        # The autoscaler owns the count; this is only the size the Deployment is created with.
        metadata["annotations"] = {REPLICAS_ANNOTATION: AUTOSCALER}
        replicas = max(spec.autoscaling.min_replicas, 1)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(spec)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(spec),
                    "annotations": {**_scrape_annotations(), **spec.pod_annotations, CHECKSUM_ANNOTATION: checksum},
                },
                "spec": pod_spec,
            },
        },
    }


def service(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec),
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]
            + ([_grpc_service_port(spec.grpc_port)] if spec.grpc_port else []),
        },
    }


def _grpc_service_port(port: int) -> dict[str, Any]:
    # appProtocol: meshes and Gateway implementations speak HTTP/2 in clear text (h2c) to it
    return {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}


def _seconds(value: float) -> str:
    return str(_number(value))


def _quantity(value: float) -> str:
    """A Kubernetes quantity: whole numbers as is, fractions in thousandths (``2.5`` -> ``2500m``)."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def pods_query(spec: PipelineSpec, metric: str) -> str:
    """PromQL: the metric summed over the Pipeline's pods (what KEDA divides by the replica count)."""
    return f'sum({METRIC_SERIES[metric]}{{namespace="{spec.namespace}",pipeline="{spec.name}"}})'


def _scale_target(spec: PipelineSpec) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name}


def _scale_down(auto: Autoscaling) -> dict[str, Any]:
    return {"scaleDown": {"stabilizationWindowSeconds": auto.scale_down_stabilization_seconds}}


def horizontal_pod_autoscaler(spec: PipelineSpec, auto: Autoscaling) -> dict[str, Any]:
    """autoscaling/v2 on the Deployment: CPU as a resource metric, the rest as ``Pods`` metrics.

    ``Pods`` metrics come from the custom metrics API, which a Prometheus adapter serves (its rules are in
    ``deploy/prometheus/adapter-rules.yaml``); the target is an average per pod.
    """
    if auto.metric == "cpu":
        metric: dict[str, Any] = {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": int(auto.target)}},
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": METRIC_SERIES[auto.metric]},
                "target": {"type": "AverageValue", "averageValue": _quantity(auto.target)},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "scaleTargetRef": _scale_target(spec),
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [metric],
            "behavior": _scale_down(auto),
        },
    }


def scaled_object(spec: PipelineSpec, auto: Autoscaling) -> dict[str, Any]:
    """A KEDA ScaledObject on the Deployment: a Prometheus trigger (or KEDA's cpu trigger); allows 0 replicas."""
    if auto.metric == "cpu":
        trigger: dict[str, Any] = {
            "type": "cpu", "metricType": "Utilization", "metadata": {"value": str(int(auto.target))}
        }
    else:
        assert auto.prometheus is not None, "spec.parse requires it"
        trigger = {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": auto.prometheus,
                "query": auto.query or pods_query(spec, auto.metric),
                "threshold": str(_number(auto.target)),
            },
        }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "scaleTargetRef": _scale_target(spec),
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _scale_down(auto)}},
            "triggers": [trigger],
        },
    }


def pod_disruption_budget(spec: PipelineSpec) -> dict[str, Any] | None:
    """``spec.disruption.minAvailable``, else one pod at a time when there can be more than one; else none."""
    most = spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas
    if spec.min_available is None and most <= 1:
        return None
    budget: dict[str, Any] = (
        {"maxUnavailable": 1} if spec.min_available is None else {"minAvailable": spec.min_available}
    )
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            **budget,
            "selector": {"matchLabels": selector_labels(spec)},
            # A pod that is not ready serves nothing: evicting it never costs availability.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _monitoring_metadata(spec: PipelineSpec, name: str) -> dict[str, Any]:
    metadata = _metadata(spec, name)
    metadata["labels"] = {**spec.monitoring.labels, **metadata["labels"]}
    return metadata


def pod_monitor(spec: PipelineSpec) -> dict[str, Any]:
    """prometheus-operator PodMonitor scraping the pods' /metrics, labelling samples with ``pipeline``."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _monitoring_metadata(spec, spec.name),
        "spec": {
            "selector": {"matchLabels": selector_labels(spec)},
            "podMetricsEndpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "relabelings": [
                        {
                            "action": "replace",
                            "sourceLabels": ["__meta_kubernetes_pod_label_aqueduct_dev_pipeline"],
                            "targetLabel": "pipeline",
                        }
                    ],
                }
            ],
        },
    }


def objectives_rules(spec: PipelineSpec) -> list[dict[str, Any]]:
    """Recording rules stating the Pipeline's queue capacity and p99 latency target, for the chart's alerts."""
    labels = {"namespace": spec.namespace, "pipeline": spec.name}
    capacity = spec.queue_size if spec.queue_size is not None else ENGINE_QUEUE_SIZE
    rules = [{"record": QUEUE_CAPACITY_RECORD, "expr": f"vector({capacity})", "labels": labels}]
    if spec.monitoring.latency_target is not None:
        target = _seconds(spec.monitoring.latency_target)
        rules.append({"record": LATENCY_TARGET_RECORD, "expr": f"vector({target})", "labels": labels})
    return rules


def prometheus_rule(spec: PipelineSpec) -> dict[str, Any]:
    """prometheus-operator PrometheusRule holding :func:`objectives_rules` (``<name>-objectives``)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _monitoring_metadata(spec, f"{spec.name}-objectives"),
        "spec": {"groups": [{"name": f"aqueduct-objectives-{spec.namespace}-{spec.name}",
                             "rules": objectives_rules(spec)}]},
    }


def _namespaces(names: tuple[str, ...]) -> dict[str, Any]:
    return {"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(names)}
    ]}}


def network_policy(spec: PipelineSpec) -> dict[str, Any]:
    """``spec.networkPolicy``: the pods admit the HTTP and gRPC ports from their own namespace's pods and
    from ``ingressNamespaces`` (inference), the HTTP port from ``metricsNamespaces`` (Prometheus scraping
    ``/metrics``).

    ``/metrics`` is served on the inference port, and a NetworkPolicy admits ports, not paths: a metrics
    namespace can reach the inference API too. Egress is left open (model downloads, a handler's calls).
    """
    access = spec.network_policy
    port = [{"protocol": "TCP", "port": HTTP_PORT}]
    inference = port + ([{"protocol": "TCP", "port": spec.grpc_port}] if spec.grpc_port else [])
    rules: list[dict[str, Any]] = [{"from": [{"podSelector": {}}], "ports": inference}]
    if access.ingress_namespaces:
        rules.append({"from": [_namespaces(access.ingress_namespaces)], "ports": inference})
    if access.metrics_namespaces:
        rules.append({"from": [_namespaces(access.metrics_namespaces)], "ports": port})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec, spec.name),
        "spec": {"podSelector": {"matchLabels": selector_labels(spec)}, "policyTypes": ["Ingress"], "ingress": rules},
    }


# Kinds the operator renders only for some Pipelines; one it no longer renders is deleted.
OPTIONAL_KINDS = (
    "HorizontalPodAutoscaler", "ScaledObject", "PodDisruptionBudget", "PodMonitor", "PrometheusRule", "NetworkPolicy"
)


def optional_children(spec: PipelineSpec) -> list[dict[str, Any]]:
    """The optional children this Pipeline wants, in apply order."""
    objs: list[dict[str, Any] | None] = [pod_disruption_budget(spec)]
    if spec.autoscaling is not None:
        make = scaled_object if spec.autoscaling.engine == "keda" else horizontal_pod_autoscaler
        objs.append(make(spec, spec.autoscaling))
    if spec.monitoring.prometheus_operator:
        objs += [pod_monitor(spec), prometheus_rule(spec)]
    if spec.network_policy.enabled:
        objs.append(network_policy(spec))
    return [obj for obj in objs if obj is not None]


def child_names(spec: PipelineSpec) -> dict[str, str]:
    """The name each optional kind has when rendered (to find one that is no longer wanted)."""
    return {kind: f"{spec.name}-objectives" if kind == "PrometheusRule" else spec.name for kind in OPTIONAL_KINDS}


def render(spec: PipelineSpec) -> list[dict[str, Any]]:
    """The desired children of a validated Pipeline, in apply order: ConfigMap, Deployment, Service, then
    the optional ones (PodDisruptionBudget, the autoscaler, PodMonitor, PrometheusRule, NetworkPolicy)."""
    cm = configmap(spec)
    return [cm, deployment(spec, config_checksum(cm["data"][CONFIG_FILE])), service(spec), *optional_children(spec)]


def desired_objects(
    body: Mapping[str, Any],
    default_image: str | None = None,
    runtime_images: Mapping[str, str] | None = None,
    policy: Policy | None = None,
) -> list[dict[str, Any]]:
    """``Pipeline`` object -> desired objects (images and policy as :func:`~aqueduct_operator.spec.parse` takes
    them).

    Raises :class:`~aqueduct_operator.spec.InvalidSpec`."""
    return render(parse(body, default_image, runtime_images, policy))
