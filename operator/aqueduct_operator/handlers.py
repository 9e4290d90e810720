"""Thin kopf handlers: every trigger ends in :func:`aqueduct_operator.apply.reconcile`.

Triggers: the Pipeline's create/update/resume, a periodic resync timer, and watch events of the
children (a Deployment's status changes, or a child is hand-edited or deleted). Handlers are sync
``def``: the ``kubernetes`` client blocks, and kopf runs sync handlers in worker threads.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
import urllib3.exceptions
from kubernetes import config
from kubernetes.client.exceptions import ApiException

from aqueduct_operator import API_VERSION, GROUP, KIND, PLURAL, VERSION, images, policy
from aqueduct_operator.apply import Cluster, reconcile
from aqueduct_operator.images import IMAGE_ENV
from aqueduct_operator.render import MANAGED_BY, PIPELINE_LABEL

RESYNC_SECONDS = float(os.environ.get("AQUEDUCT_OPERATOR_RESYNC_SECONDS", "60"))
RETRY_DELAY = float(os.environ.get("AQUEDUCT_OPERATOR_RETRY_SECONDS", "10"))
CHILDREN = {"app.kubernetes.io/managed-by": MANAGED_BY}

log = logging.getLogger(__name__)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.execution.max_workers = int(os.environ.get("AQUEDUCT_OPERATOR_WORKERS", "8"))
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    if "cluster" not in memo:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        memo.cluster = Cluster()


def _pipeline_ref(namespace: str, name: str, uid: str | None) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"namespace": namespace, "name": name, "uid": uid}}


def _run(memo: Any, namespace: str | None, name: str, uid: str | None = None) -> None:
    assert namespace, "Pipelines are namespaced"
    ref = _pipeline_ref(namespace, name, uid)

    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(ref, type=type_, reason=reason, message=message[:1000])  # type: ignore[arg-type]

    try:
        reconcile(memo.cluster, namespace, name, emit, default_image=os.environ.get(IMAGE_ENV) or None,
                  runtime_images=images.from_environ(os.environ), policy=policy.from_environ(os.environ))
    except ApiException as e:
        raise kopf.TemporaryError(f"API error {e.status} {e.reason}", delay=RETRY_DELAY) from e
    except urllib3.exceptions.HTTPError as e:
        raise kopf.TemporaryError(f"API unreachable: {e}", delay=RETRY_DELAY) from e


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def pipeline_changed(memo: Any, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    _run(memo, namespace, name, uid)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(memo: Any, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    _run(memo, namespace, name, uid)


@kopf.on.event("", "v1", "pods", labels=CHILDREN)  # a model download (init container) failing
@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN)
@kopf.on.event("", "v1", "configmaps", labels=CHILDREN)
@kopf.on.event("", "v1", "services", labels=CHILDREN)
def child_event(memo: Any, type: str, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    pipeline = body.metadata.labels.get(PIPELINE_LABEL)
    if not pipeline or type is None:  # None: the initial listing; the Pipeline's resume handler covers it
        return
    refs: list[dict[str, Any]] = body.metadata.get("ownerReferences", [])
    owner: dict[str, Any] = next((ref for ref in refs if ref.get("kind") == KIND), {})
    try:
        _run(memo, namespace, pipeline, owner.get("uid"))
    except kopf.TemporaryError as e:  # event handlers are not retried; the resync timer catches up
        log.warning("Reconciling %s/%s after a %s event failed: %s", namespace, pipeline, body.get("kind"), e)
