"""Building the flow from settings: handler and condition imports, with errors naming the field."""

from __future__ import annotations

import pytest
from aqueduct_service.pipeline import build_flow
from aqueduct_service.settings import ConfigError, Settings, StepSettings


def settings(**step: object) -> Settings:
    options = {"name": "echo", "handler": "tests.service.handlers:EchoHandler", **step}
    return Settings(name="m", steps=(StepSettings(**options),), queue_size=8)  # type: ignore[arg-type]


def test_builds_named_steps_with_batching() -> None:
    flow = build_flow(settings(nprocs=2, batch_size=8, batch_timeout=0.01, handle_condition="operator:truth"))
    (step,) = flow.steps
    assert (step.name, step.nprocs, step.batch_size, step.batch_timeout) == ("echo", 2, 8, 0.01)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"handler": "tests.service.missing:X"}, r"steps\[0\]\.handler: cannot import module 'tests.service.missing'"),
        ({"handler": "tests.service.handlers:Nope"}, r"steps\[0\]\.handler: .* has no attribute 'Nope'"),
        ({"handler": "tests.service.handlers:POISON"}, "is not a BaseTaskHandler subclass"),
        ({"handle_condition": "tests.service.handlers:POISON"}, r"steps\[0\]\.handle_condition: .* is not callable"),
    ],
)
def test_bad_references(step: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_flow(settings(**step))
