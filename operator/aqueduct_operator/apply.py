"""Reconcile one Pipeline: create-or-patch its children, repair drift, write its status.

Talks to the API with the (blocking) ``kubernetes`` client, so it runs in kopf's handler threads.
Writes use JSON patch (children) and JSON merge patch (status) with explicit content types: no
strategic merge (not for custom resources) and no server-side apply, so the same calls behave
identically on a real API server and on kmock.

A child is left alone when (a) its ``aqueduct.dev/desired-hash`` annotation matches the hash of what
the operator would write now, and (b) every field the operator sets still has that value (server-side
defaults may add fields; hand edits change or remove them). Otherwise the fields the operator owns are
replaced wholesale. So re-running a reconcile is a no-op, and a hand-edited or deleted child comes back.
A Deployment whose replica count an autoscaler owns (``aqueduct.dev/replicas-owner: autoscaler``) is
created at the minimum and its ``spec.replicas`` is never written again: no fight with the autoscaler.
Optional children the Pipeline no longer wants (autoscaling turned off, ...) are deleted when its spec
changes (a new generation, not yet in ``status.observedGeneration``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import InvalidOperation
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity

from aqueduct_operator import GROUP, PLURAL, VERSION, status
from aqueduct_operator.policy import Policy
from aqueduct_operator.render import (
    AUTOSCALER,
    OPTIONAL_KINDS,
    PIPELINE_LABEL,
    REPLICAS_ANNOTATION,
    child_names,
    render,
    selector_labels,
)
from aqueduct_operator.spec import InvalidSpec, PipelineSpec, parse

USER_AGENT = "aqueduct-operator"
TIMEOUT = 30  # seconds, per API call: a hung call must not wedge a handler thread
DESIRED_HASH = "aqueduct.dev/desired-hash"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# The fields of each child kind the operator owns (replaced as a whole when they drift).
OWNED_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ConfigMap": (("data",),),
    "Deployment": (("spec", "replicas"), ("spec", "strategy"), ("spec", "template")),
    "Service": (("spec", "type"), ("spec", "selector"), ("spec", "ports")),
    **{kind: (("spec",),) for kind in OPTIONAL_KINDS},
}
# group, version, plural of the kinds reached through the generic (custom objects) API.
GENERIC_KINDS: dict[str, tuple[str, str, str]] = {
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
    "PrometheusRule": ("monitoring.coreos.com", "v1", "prometheusrules"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
}

# (event type, reason, message) about the Pipeline; the handlers post them as Kubernetes Events.
Emit = Callable[[str, str, str], None]


class ChildConflict(Exception):
    """A child's name is taken by an object this Pipeline does not own."""


@dataclass(frozen=True)
class Outcome:
    action: str  # created, updated, repaired, unchanged
    obj: dict[str, Any]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data or b"{}")
    return data


class Cluster:
    """The few API calls the operator makes, returning plain dicts (exactly what the server sent)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            api_client = client.ApiClient()
            api_client.user_agent = USER_AGENT
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def _ops(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        if kind == "ConfigMap":
            c = self.core
            return c.read_namespaced_config_map, c.create_namespaced_config_map, c.patch_namespaced_config_map
        if kind == "Service":
            c = self.core
            return c.read_namespaced_service, c.create_namespaced_service, c.patch_namespaced_service
        if kind == "Deployment":
            a = self.apps
            return a.read_namespaced_deployment, a.create_namespaced_deployment, a.patch_namespaced_deployment
        group, version, plural = GENERIC_KINDS[kind]
        custom = self.custom

        def read(name: str, namespace: str, **kw: Any) -> Any:
            return custom.get_namespaced_custom_object(group, version, namespace, plural, name, **kw)

        def create(namespace: str, body: Any, **kw: Any) -> Any:
            return custom.create_namespaced_custom_object(group, version, namespace, plural, body, **kw)

        def patch(name: str, namespace: str, body: Any, **kw: Any) -> Any:
            return custom.patch_namespaced_custom_object(group, version, namespace, plural, name, body, **kw)

        return read, create, patch

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read, _, _ = self._ops(kind)
        try:
            return _json(read(name, namespace, _preload_content=False, _request_timeout=TIMEOUT))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        _, create, _ = self._ops(obj["kind"])
        return _json(create(obj["metadata"]["namespace"], obj, _preload_content=False, _request_timeout=TIMEOUT))

    def json_patch(self, kind: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        _, _, patch = self._ops(kind)
        return _json(patch(
            name, namespace, ops, _content_type=JSON_PATCH, _preload_content=False, _request_timeout=TIMEOUT
        ))

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Pods carrying every one of ``labels`` (filtered here too: a selector is only a hint to some servers)."""
        selector = ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
        items: list[dict[str, Any]] = _json(self.core.list_namespaced_pod(
            namespace, label_selector=selector, _preload_content=False, _request_timeout=TIMEOUT
        )).get("items") or []
        return [pod for pod in items if labels.items() <= ((pod.get("metadata") or {}).get("labels") or {}).items()]

    def delete(self, kind: str, namespace: str, name: str) -> None:
        group, version, plural = GENERIC_KINDS[kind]
        try:
            self.custom.delete_namespaced_custom_object(
                group, version, namespace, plural, name, _preload_content=False, _request_timeout=TIMEOUT
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def get_pipeline(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False, _request_timeout=TIMEOUT
            ))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_pipeline_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return _json(self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, dict(patch),
            _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=TIMEOUT,
        ))


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _scalar_equal(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return False
    if isinstance(want, (int, float)) and isinstance(have, (int, float)):
        return bool(want == have)
    if isinstance(want, (str, int)) and isinstance(have, (str, int)):
        if str(want) == str(have):
            return True
        try:  # resource quantities come back normalised: 0.5 -> 500m, 1 -> "1"
            return bool(parse_quantity(want) == parse_quantity(have))  # type: ignore[no-untyped-call]
        except (ValueError, InvalidOperation, TypeError):
            return False
    return False


def is_subset(want: Any, have: Any) -> bool:
    """Whether ``have`` carries every field of ``want`` with the same value (extra fields allowed)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    return _scalar_equal(want, have)


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _dig(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def owned_paths(obj: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """The fields of ``obj`` (desired) the operator keeps as rendered; not replicas an autoscaler owns."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    paths = OWNED_PATHS[obj["kind"]]
    if annotations.get(REPLICAS_ANNOTATION) == AUTOSCALER:
        paths = tuple(path for path in paths if path != ("spec", "replicas"))
    return paths


def _owned(obj: Mapping[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    return {"/".join(path): _dig(obj, path) for path in paths}


def _patch_ops(desired: Mapping[str, Any], live: Mapping[str, Any]) -> list[dict[str, Any]]:
    meta = desired["metadata"]
    live_meta = live.get("metadata") or {}
    ops: list[dict[str, Any]] = []
    for field in ("labels", "annotations"):
        if not live_meta.get(field):
            ops.append({"op": "add", "path": _pointer("metadata", field), "value": dict(meta[field])})
        else:
            ops += [
                {"op": "add", "path": _pointer("metadata", field, key), "value": value}
                for key, value in meta[field].items() if live_meta[field].get(key) != value
            ]
    if REPLICAS_ANNOTATION in (live_meta.get("annotations") or {}) and REPLICAS_ANNOTATION not in meta["annotations"]:
        ops.append({"op": "remove", "path": _pointer("metadata", "annotations", REPLICAS_ANNOTATION)})
    others = [ref for ref in live_meta.get("ownerReferences") or [] if not ref.get("controller")]
    owners = meta["ownerReferences"] + others
    ops.append({"op": "add", "path": _pointer("metadata", "ownerReferences"), "value": owners})
    for path in owned_paths(desired):
        if len(path) > 1 and path[0] not in live:
            ops.append({"op": "add", "path": _pointer(path[0]), "value": {}})
        ops.append({"op": "add", "path": _pointer(*path), "value": _dig(desired, path)})
    return ops


def _controlled_by(live: Mapping[str, Any], spec: PipelineSpec) -> bool:
    refs = (live.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == spec.uid for ref in refs)


def prune(cluster: Cluster, spec: PipelineSpec, wanted: set[str]) -> list[str]:
    """Delete the optional children this Pipeline controls but no longer wants; returns 'Kind name' of each."""
    deleted = []
    for kind, name in child_names(spec).items():
        if kind in wanted:
            continue
        live = cluster.get(kind, spec.namespace, name)
        if live is not None and _controlled_by(live, spec):
            cluster.delete(kind, spec.namespace, name)
            deleted.append(f"{kind} {name}")
    return deleted


def _check_ownership(desired: Mapping[str, Any], live: Mapping[str, Any], spec: PipelineSpec) -> None:
    meta = live.get("metadata") or {}
    controllers = [ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")]
    ours = desired["metadata"]["ownerReferences"][0]
    for ref in controllers:
        if ref.get("uid") == ours["uid"]:
            return
        if ref.get("kind") != ours["kind"] or ref.get("name") != ours["name"]:
            raise ChildConflict(
                f"{live['kind']} {meta.get('name')} is controlled by {ref.get('kind')} {ref.get('name')}"
            )
    # No controller, or a previous Pipeline of the same name: adopt only what carries our label.
    if (meta.get("labels") or {}).get(PIPELINE_LABEL) != spec.name:
        raise ChildConflict(
            f"{live['kind']} {meta.get('name')} already exists and is not managed by this Pipeline "
            f"(no {PIPELINE_LABEL}={spec.name} label); rename the Pipeline or delete the object"
        )


def ensure(cluster: Cluster, desired: dict[str, Any], spec: PipelineSpec) -> Outcome:
    """Create ``desired`` or bring the live object back to it; a no-op when it already matches."""
    kind, meta = desired["kind"], desired["metadata"]
    want_hash = digest(desired)
    body = {**desired, "metadata": {**meta, "annotations": {**meta.get("annotations", {}), DESIRED_HASH: want_hash}}}
    live = cluster.get(kind, meta["namespace"], meta["name"])
    if live is None:
        try:
            return Outcome("created", cluster.create(body))
        except ApiException as e:
            if e.status != 409:
                raise
            live = cluster.get(kind, meta["namespace"], meta["name"])
            if live is None:
                raise
    _check_ownership(body, live, spec)
    live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(DESIRED_HASH)
    paths = owned_paths(body)
    in_place = is_subset(_owned(body, paths), _owned(live, paths)) and is_subset(
        {k: body["metadata"][k] for k in ("labels", "annotations", "ownerReferences")}, live.get("metadata") or {}
    )
    if in_place and live_hash == want_hash:
        return Outcome("unchanged", live)
    patched = cluster.json_patch(kind, meta["namespace"], meta["name"], _patch_ops(body, live))
    return Outcome("updated" if live_hash != want_hash else "repaired", patched)


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def _write_status(
    cluster: Cluster, body: Mapping[str, Any], new: dict[str, Any], emit: Emit
) -> None:
    meta = body["metadata"]
    previous = body.get("status") or {}
    if not status.changed(previous, new):
        return
    patch = {key: new.get(key) for key in status.OWNED_KEYS}
    cluster.patch_pipeline_status(meta["namespace"], meta["name"], {"status": patch})
    before, after = status.ready_condition(previous), status.ready_condition(new)
    warned = None
    if (before.get("status"), before.get("reason")) != (after.get("status"), after.get("reason")):
        if after.get("status") == "True":
            emit("Normal", "Ready", after.get("message", ""))
        elif after.get("reason") not in (None, "Reconciling", "ReplicasNotReady", "ScaledToZero"):
            warned = after["reason"]
            emit("Warning", warned, after.get("message", ""))
        else:
            emit("Normal", after.get("reason", "NotReady"), after.get("message", ""))
    # Degraded while still Ready (e.g. new pods failing during a rollout, old ones serving) warns too.
    before, after = status.degraded_condition(previous), status.degraded_condition(new)
    if after.get("status") == "True" and after.get("reason") != warned and (
        (before.get("status"), before.get("reason")) != ("True", after.get("reason"))
    ):
        emit("Warning", after["reason"], after.get("message", ""))


def reconcile(
    cluster: Cluster, namespace: str, name: str, emit: Emit, default_image: str | None = None,
    runtime_images: Mapping[str, str] | None = None, policy: Policy | None = None,
) -> dict[str, Any] | None:
    """Bring the Pipeline ``namespace/name``'s children and status in line with its spec.

    ``default_image`` and ``runtime_images`` serve Pipelines without ``spec.image``; ``policy`` is what
    Pipelines may use (see :func:`aqueduct_operator.spec.parse`).

    Returns the status written (or kept), None when the Pipeline is gone or being deleted.
    Transient API failures (5xx, timeouts) propagate, for the caller to retry later.
    """
    with _lock(namespace, name):
        body = cluster.get_pipeline(namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return None
        generation = int(body["metadata"].get("generation") or 0)
        previous = body.get("status") or {}
        try:
            spec = parse(body, default_image, runtime_images, policy)
        except InvalidSpec as e:
            new = status.failed(generation, status.Failure("InvalidSpec", str(e)), previous, now())
            _write_status(cluster, body, new, emit)
            return new

        deployment = None
        objs = render(spec)
        obj: dict[str, Any] | None = None  # the child being applied, for error messages
        try:
            if previous.get("observedGeneration") != generation:  # only a spec change makes a child unwanted
                for what in prune(cluster, spec, {o["kind"] for o in objs}):
                    emit("Normal", "Deleted", f"{what} deleted (no longer wanted by the spec)")
            for obj in objs:
                outcome = ensure(cluster, obj, spec)
                if outcome.action != "unchanged":
                    what = f"{obj['kind']} {obj['metadata']['name']}"
                    recreated = outcome.action == "created" and previous.get("observedGeneration") is not None
                    reason = "Recreated" if recreated else outcome.action.capitalize()
                    emit("Normal", reason, f"{what} {'recreated' if recreated else outcome.action}")
                if obj["kind"] == "Deployment":
                    deployment = outcome.obj
        except ChildConflict as e:
            new = status.failed(generation, status.Failure("ChildConflict", str(e)), previous, now(), spec=spec)
            _write_status(cluster, body, new, emit)
            return new
        except ApiException as e:
            if e.status is None or e.status >= 500 or e.status in (409, 429):
                raise
            what = "pruning unwanted children" if obj is None else f"{obj['kind']} {obj['metadata']['name']}"
            message = f"{what}: {_api_message(e)}"
            if e.status == 404 and obj is not None and obj["kind"] in GENERIC_KINDS:
                group, version, _ = GENERIC_KINDS[obj["kind"]]
                message += f" (does this cluster serve {group}/{version} {obj['kind']}? install its CRD)"
            new = status.failed(generation, status.Failure("ApplyFailed", message), previous, now(), spec=spec)
            _write_status(cluster, body, new, emit)
            return new

        # A failed model download or a serving container exiting 2 shows in the pods, not the Deployment.
        pods = cluster.list_pods(namespace, selector_labels(spec))
        new = status.compute(spec, deployment, previous, now(), pods)
        _write_status(cluster, body, new, emit)
        return new


def _api_message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except (ValueError, AttributeError):
        return f"{e.status} {e.reason}"

