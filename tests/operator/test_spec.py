"""Unit layer: semantic validation names the offending field (what the CRD schema cannot catch)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from aqueduct_operator.spec import InvalidSpec, parse

BASE: dict[str, Any] = {
    "metadata": {"name": "cats", "namespace": "ns", "uid": "u", "generation": 3},
    "spec": {"image": "aqueduct:dev", "steps": [{"name": "detect", "handler": "pkg.mod:Handler"}]},
}


def with_spec(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(BASE)
    body["spec"].update(changes)
    return body


def test_defaults() -> None:
    spec = parse(BASE)
    assert (spec.name, spec.namespace, spec.generation, spec.replicas) == ("cats", "ns", 3, 1)
    (step,) = spec.steps
    assert (step.nprocs, step.batch_size, step.batch_timeout, step.handle_condition) == (1, 1, 0.0, None)
    assert (spec.timeout, spec.queue_size, spec.queue_priorities, spec.graceful_timeout) == (5.0, None, 1, 30.0)


STEP = {"name": "detect", "handler": "pkg.mod:Handler"}


@pytest.mark.parametrize(("body", "field"), [
    (with_spec(steps=[{**STEP, "handler": "pkg/mod.py"}]), "spec.steps[0].handler"),
    (with_spec(steps=[{**STEP, "handler": "pkg.mod.Handler"}]), "spec.steps[0].handler"),
    (with_spec(steps=[{**STEP, "handleCondition": "nope"}]), "spec.steps[0].handleCondition"),
    (with_spec(steps=[{**STEP, "options": {"top-k": 5}}]), "spec.steps[0].options.top-k"),
    (with_spec(steps=[{**STEP, "options": [5]}]), "spec.steps[0].options"),
    (with_spec(steps=[STEP, {**STEP}]), "spec.steps[1].name"),
    (with_spec(steps=[{**STEP, "name": "Bad Name"}]), "spec.steps[0].name"),
    (with_spec(steps=[{**STEP, "batchSize": 0}]), "spec.steps[0].batchSize"),
    (with_spec(steps=[{**STEP, "batchSize": True}]), "spec.steps[0].batchSize"),
    (with_spec(steps=[{**STEP, "batchTimeout": -1}]), "spec.steps[0].batchTimeout"),
    (with_spec(steps=[{**STEP, "nprocs": 65}]), "spec.steps[0].nprocs"),
    (with_spec(steps=[{**STEP, "batchTimeout": 6}]), "spec.steps[0].batchTimeout"),  # >= timeout (5)
    (with_spec(steps=[{**STEP, "batchsize": 4}]), "spec.steps[0].batchsize"),
    (with_spec(steps=[{"name": "x"}]), "spec.steps[0].handler"),
    (with_spec(steps=[]), "spec.steps"),
    (with_spec(steps="detect"), "spec.steps"),
    (with_spec(replicas=-1), "spec.replicas"),
    (with_spec(timeout=0), "spec.timeout"),
    (with_spec(queue={"size": 0}), "spec.queue.size"),
    (with_spec(queue={"priorities": 17}), "spec.queue.priorities"),
    (with_spec(batchSize=4), "spec.batchSize"),
    (with_spec(server={"logLevel": "loud"}), "spec.server.logLevel"),
    (with_spec(server={"grpcPort": 8080}), "spec.server.grpcPort"),
    (with_spec(server={"grpcPort": -1}), "spec.server.grpcPort"),
    (with_spec(server={"grpcPort": 0, "grpcReadinessProbe": True}), "spec.server.grpcReadinessProbe"),
    (with_spec(server={"grpcReadinessProbe": "yes"}), "spec.server.grpcReadinessProbe"),
    (with_spec(resources={"limits": {"memory": "lots"}}), "spec.resources.limits.memory"),
    (with_spec(resources={"limits": {"nvidia.com/gpu": "0.5"}}), "spec.resources.limits.nvidia.com/gpu"),
    (with_spec(resources={"requests": {"nvidia.com/gpu": 1}}), "spec.resources.limits.nvidia.com/gpu"),
    (with_spec(resources={"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 1}}),
     "spec.resources.requests.nvidia.com/gpu"),
    (with_spec(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]), "spec.env[1].name"),
    (with_spec(env=[{"name": "A", "value": 1}]), "spec.env[0].value"),
    (with_spec(env=[{"name": "AQUEDUCT_CONFIG", "value": "/x"}]), "spec.env[0].name"),
    (with_spec(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]), "spec.tolerations[0].value"),
    (with_spec(nodeSelector={"a": 1}), "spec.nodeSelector.a"),
    (with_spec(image=""), "spec.image"),
    ({"metadata": {"name": "cats.v2"}, "spec": BASE["spec"]}, "metadata.name"),
    ({"metadata": {"name": "9lives"}, "spec": BASE["spec"]}, "metadata.name"),
    ({"metadata": {"name": "x" * 64}, "spec": BASE["spec"]}, "metadata.name"),
    ({"metadata": {"name": "cats"}}, "spec"),
])
def test_invalid_spec_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse(body)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")
