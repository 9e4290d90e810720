"""Pure status computation: a Pipeline's status from its Deployment's status (or from an error).

Conditions follow metav1.Condition (type, status, observedGeneration, lastTransitionTime, reason,
message); ``lastTransitionTime`` only moves when a condition's status flips, so recomputing an
unchanged situation yields an identical status and reconciliation issues no patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aqueduct_operator import storage
from aqueduct_operator.render import CONTAINER, selector_string, url
from aqueduct_operator.spec import PipelineSpec

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)
MODEL_FETCH_FAILED = "ModelFetchFailed"
# The serving container exited with status 2: its config, a model file or a runtime cannot be served.
SERVE_FAILED = "ServingConfigInvalid"
CONFIG_ERROR_EXIT = 2
# The pod's one-line error (aqueduct-serve prints "aqueduct-serve: <what>" to stderr before exiting 2).
SERVE_ERROR_PREFIX = "aqueduct-serve:"
MESSAGE_LIMIT = 2000
# Keys of .status this operator owns (anything else, e.g. kopf's bookkeeping, is left alone).
OWNED_KEYS = ("observedGeneration", "replicas", "desiredReplicas", "readyReplicas", "selector", "url", "conditions")


@dataclass(frozen=True)
class Failure:
    """Why a Pipeline cannot be reconciled: ``reason`` is CamelCase (e.g. ``InvalidSpec``)."""

    reason: str
    message: str


def _condition(
    previous: Mapping[str, Mapping[str, Any]], kind: str, status: bool, reason: str, message: str,
    generation: int, now: str,
) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(kind)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else None
    return {
        "type": kind,
        "status": value,
        "observedGeneration": generation,
        "lastTransitionTime": since or now,
        "reason": reason,
        "message": message,
    }


def _by_type(conditions: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in conditions or () if isinstance(c, Mapping) and "type" in c}


def failed(
    generation: int, failure: Failure, previous: Mapping[str, Any], now: str, *, spec: PipelineSpec | None = None
) -> dict[str, Any]:
    """Status of a Pipeline that cannot be (fully) reconciled: Ready=False, Degraded=True, with the reason."""
    before = _by_type(previous.get("conditions"))
    result: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": previous.get("replicas", 0),
        "desiredReplicas": previous.get("desiredReplicas", 0),
        "readyReplicas": previous.get("readyReplicas", 0),
        "selector": selector_string(spec) if spec else None,
        "url": url(spec) if spec else None,
        "conditions": [
            _condition(before, READY, False, failure.reason, failure.message, generation, now),
            _condition(before, PROGRESSING, False, failure.reason, failure.message, generation, now),
            _condition(before, DEGRADED, True, failure.reason, failure.message, generation, now),
        ],
    }
    return result


def _deployment_condition(deployment: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return _by_type((deployment.get("status") or {}).get("conditions")).get(kind, {})


def _terminations(
    pods: Sequence[Mapping[str, Any]], statuses: str, container: str
) -> list[tuple[str, Mapping[str, Any]]]:
    """(pod name, latest termination) of ``container`` in each pod, by pod name: its state, or while it waits to
    restart (CrashLoopBackOff) its last state."""
    found = []
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name"))):
        for status in (pod.get("status") or {}).get(statuses) or []:
            if status.get("name") == container:
                state = status.get("state") or {}
                last = (status.get("lastState") or {}) if "waiting" in state else state
                found.append((str((pod.get("metadata") or {}).get("name")), last.get("terminated") or {}))
    return found


def fetch_failure(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """What went wrong in a pod whose model download failed (the first such pod by name); None if none did."""
    for name, terminated in _terminations(pods, "initContainerStatuses", storage.FETCH_CONTAINER):
        if terminated.get("exitCode", 0) != 0:
            detail = str(terminated.get("message") or terminated.get("reason") or "").strip()
            code = terminated["exitCode"]
            return f"pod {name}: init container {storage.FETCH_CONTAINER} failed (exit code {code}): {detail}"
    return None


def _serve_error(message: str) -> str:
    """The pod's own error from a termination message (the log tail): from its last ``aqueduct-serve:`` line on."""
    lines = message.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(SERVE_ERROR_PREFIX)]
    text = "\n".join(lines[starts[-1]:] if starts else lines)
    return text if len(text) <= MESSAGE_LIMIT else "..." + text[-MESSAGE_LIMIT:]


def serve_failure(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """What a pod whose serving container exited with status 2 said (the first such pod by name); None if none."""
    for name, terminated in _terminations(pods, "containerStatuses", CONTAINER):
        if terminated.get("exitCode") == CONFIG_ERROR_EXIT:
            detail = _serve_error(str(terminated.get("message") or terminated.get("reason") or ""))
            return f"pod {name}: the serving container cannot start (exit code {CONFIG_ERROR_EXIT}): {detail}"
    return None


def desired_replicas(spec: PipelineSpec, deployment: Mapping[str, Any] | None) -> int:
    """spec.replicas; with autoscaling, what the autoscaler last asked of the Deployment."""
    if spec.autoscaling is None:
        return spec.replicas
    live = ((deployment or {}).get("spec") or {}).get("replicas")
    return int(live) if live is not None else max(spec.autoscaling.min_replicas, 1)


def compute(
    spec: PipelineSpec,
    deployment: Mapping[str, Any] | None,
    previous: Mapping[str, Any],
    now: str,
    pods: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Status of a valid Pipeline whose children are applied, from its Deployment (None: not there yet).

    ``pods`` are the Pipeline's pods. A failed model download (init container) makes the Pipeline Degraded
    (and not Ready while replicas are missing) with reason ``ModelFetchFailed`` and the fetcher's message; a
    serving container that exited with status 2 (config, model file or runtime it cannot serve) the same, with
    reason ``ServingConfigInvalid`` and the pod's error line.
    """
    before = _by_type(previous.get("conditions"))
    gen = spec.generation
    desired = desired_replicas(spec, deployment)
    dstatus: Mapping[str, Any] = (deployment or {}).get("status") or {}
    replicas = int(dstatus.get("replicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    available = int(dstatus.get("availableReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas") or 0)
    dgen = int(((deployment or {}).get("metadata") or {}).get("generation") or 0)
    observed = deployment is not None and int(dstatus.get("observedGeneration") or 0) >= dgen

    failure: tuple[str, str] | None = None
    ready_c: tuple[bool, str, str]
    progressing_c: tuple[bool, str, str]
    if deployment is not None:
        progressing = _deployment_condition(deployment, "Progressing")
        replica_failure = _deployment_condition(deployment, "ReplicaFailure")
        if progressing.get("status") == "False":
            failure = (progressing.get("reason") or "ProgressDeadlineExceeded", progressing.get("message", ""))
        elif replica_failure.get("status") == "True":
            failure = (replica_failure.get("reason") or "ReplicaFailure", replica_failure.get("message", ""))
    pod_failure: tuple[str, str] | None = None
    fetch_failed, serve_failed = fetch_failure(pods), serve_failure(pods)
    if fetch_failed is not None:
        pod_failure = (MODEL_FETCH_FAILED, fetch_failed)
    elif serve_failed is not None:
        pod_failure = (SERVE_FAILED, serve_failed)
    if pod_failure is not None:  # what the pods say is more precise than a rollout's deadline
        failure = pod_failure

    rolled_out = observed and updated >= desired and replicas == desired and available >= desired
    if deployment is None:
        ready_c = (False, "Reconciling", "the Deployment is being created")
    elif desired == 0:
        why = "scaled to zero by the autoscaler" if spec.autoscaling else "spec.replicas is 0"
        ready_c = (False, "ScaledToZero", why)
    elif ready >= desired and available >= desired:
        ready_c = (True, "AllReplicasReady", f"{ready}/{desired} replicas ready")
    elif pod_failure is not None:
        ready_c = (False, *pod_failure)
    else:
        ready_c = (False, "ReplicasNotReady", f"{ready}/{desired} replicas ready")
    if rolled_out:
        progressing_c = (False, "RolloutComplete", f"{updated}/{desired} replicas up to date")
    elif failure:
        progressing_c = (False, failure[0], failure[1])
    else:
        progressing_c = (True, "RollingOut", f"{updated}/{desired} replicas up to date, {replicas} running")
    degraded_c = (True, failure[0], failure[1]) if failure else (False, "AsExpected", "")

    return {
        "observedGeneration": gen,
        "replicas": replicas,
        "desiredReplicas": desired,
        "readyReplicas": ready,
        "selector": selector_string(spec),
        "url": url(spec),
        "conditions": [
            _condition(before, READY, *ready_c, gen, now),
            _condition(before, PROGRESSING, *progressing_c, gen, now),
            _condition(before, DEGRADED, *degraded_c, gen, now),
        ],
    }


def changed(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(previous.get(key) != new.get(key) for key in OWNED_KEYS)


def ready_condition(status: Mapping[str, Any]) -> Mapping[str, Any]:
    return _by_type(status.get("conditions")).get(READY, {})


def degraded_condition(status: Mapping[str, Any]) -> Mapping[str, Any]:
    return _by_type(status.get("conditions")).get(DEGRADED, {})
