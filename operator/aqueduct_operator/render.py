"""Pure rendering: a ``Pipeline`` -> the ConfigMap, Deployment and Service that serve it.

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
from aqueduct_operator.spec import PipelineSpec, Step, Tensor, parse

CONFIG_DIR = "/etc/aqueduct"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
HTTP_PORT = 8080
CONTAINER = "serve"
RUN_AS = 10001
# Seconds the pod gets beyond the server's graceful timeout: preStop-free shutdown, worker joins.
GRACE_MARGIN = 15
DEFAULT_START_TIMEOUT = 300.0
STARTUP_PERIOD = 2

CHECKSUM_ANNOTATION = "checksum/config"
PIPELINE_LABEL = "aqueduct.dev/pipeline"
MANAGED_BY = "aqueduct-operator"


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
    config: dict[str, Any] = {
        "name": step.name,
        "handler": step.handler,
        "nprocs": step.nprocs,
        "batch_size": step.batch_size,
        "batch_timeout": _number(step.batch_timeout),
        "latency_target": None if step.latency_target is None else _number(step.latency_target),
        "handle_condition": step.handle_condition,
    }
    if step.options:  # only when set: Pipelines without options keep their config (and pods) unchanged
        config["options"] = dict(step.options)
    return config


def serving_config(spec: PipelineSpec) -> dict[str, Any]:
    """The serving pod's config document (``config.schema.json``, version 1): camelCase -> snake_case."""
    server: dict[str, Any] = {
        "host": "0.0.0.0",
        "port": HTTP_PORT,
        "graceful_timeout": _number(spec.graceful_timeout),
        "log_level": spec.log_level,
    }
    if spec.max_body_bytes is not None:
        server["max_body_bytes"] = spec.max_body_bytes
    if spec.workers is not None:
        server["workers"] = spec.workers
    if spec.arena_bytes is not None:
        server["arena_bytes"] = spec.arena_bytes
    return {
        "version": 1,
        "name": spec.name,
        "steps": [_step(step) for step in spec.steps],
        "inputs": [_tensor(t) for t in spec.inputs],
        "outputs": [_tensor(t) for t in spec.outputs],
        "queue_size": spec.queue_size,
        "queue_priorities": spec.queue_priorities,
        "timeout": _number(spec.timeout),
        "start_timeout": None if spec.start_timeout is None else _number(spec.start_timeout),
        "server": server,
    }


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


def _probe(path: str, *, period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http", "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
        "successThreshold": 1,
    }


def termination_grace_period(spec: PipelineSpec) -> int:
    return math.ceil(spec.graceful_timeout) + GRACE_MARGIN


def deployment(spec: PipelineSpec, checksum: str) -> dict[str, Any]:
    start_timeout = spec.start_timeout if spec.start_timeout is not None else DEFAULT_START_TIMEOUT
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "args": ["aqueduct-serve", "--config", CONFIG_PATH],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "startupProbe": _probe(
            "/v2/health/ready", period=STARTUP_PERIOD, failures=math.ceil(start_timeout / STARTUP_PERIOD) + 5
        ),
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3, timeout=5),
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
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.model is not None:
        pod_spec["volumes"].append(storage.model_volume(spec.model))
        if spec.model.fetched:
            pod_spec["initContainers"] = [storage.fetch_container(spec.model, spec.image, container["securityContext"])]
            if spec.image_pull_policy:
                pod_spec["initContainers"][0]["imagePullPolicy"] = spec.image_pull_policy
    pod_spec["volumes"] += [dict(volume) for volume in spec.volumes]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(item) for item in spec.tolerations]
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(spec)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(spec),
                    "annotations": {**spec.pod_annotations, CHECKSUM_ANNOTATION: checksum},
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
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render(spec: PipelineSpec) -> list[dict[str, Any]]:
    """The desired children of a validated Pipeline, in apply order: ConfigMap, Deployment, Service."""
    cm = configmap(spec)
    return [cm, deployment(spec, config_checksum(cm["data"][CONFIG_FILE])), service(spec)]


def desired_objects(body: Mapping[str, Any], default_image: str | None = None) -> list[dict[str, Any]]:
    """``Pipeline`` object -> desired objects. Raises :class:`~aqueduct_operator.spec.InvalidSpec`."""
    return render(parse(body, default_image))
