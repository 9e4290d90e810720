"""The operator sizes the pod's /dev/shm from the serving pod's and the engine's own defaults: they must agree."""

from __future__ import annotations

import dataclasses

import pytest
from aqueduct_operator import render
from aqueduct_operator.policy import quantity
from aqueduct_operator.spec import parse
from aqueduct_service import settings

from aqueduct._runtime import worker


def test_the_operators_copies_of_the_pods_defaults_agree() -> None:
    server = settings.ServerSettings()
    assert server.arena_bytes == render.POD_ARENA_BYTES
    assert server.max_body_bytes == render.POD_MAX_BODY_BYTES
    assert server.decode_budget_bytes == render.POD_DECODE_BUDGET_BYTES
    assert render.OUTPUT_ARENA_BYTES == worker.OUTPUT_ARENA_BYTES
    assert settings.default_workers(10_000) == render.POD_MAX_FRONT_ENDS


@pytest.mark.parametrize("cpu", ["500m", 1, "3999m", 4, "5", "7500m", 16, "64"])
def test_front_ends_for_a_cpu_limit_are_what_the_pod_starts(cpu: str | int) -> None:
    body = {"metadata": {"name": "p"}, "spec": {"image": "i", "steps": [{"name": "s", "handler": "m:H"}],
                                                "resources": {"limits": {"cpu": cpu}}}}
    spec = parse(body)
    cpus = float(quantity(cpu))
    assert render.front_ends(spec) == settings.default_workers(cpus)
    assert render.front_ends(dataclasses.replace(spec, workers=3)) == 3
