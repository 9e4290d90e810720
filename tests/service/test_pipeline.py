"""Building the flow from settings: handler and condition imports, with errors naming the field."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aqueduct_service.pipeline import build_flow
from aqueduct_service.settings import ConfigError, Settings, StepSettings, parse_settings

from tests.service.conftest import echo_config
from tests.service.handlers import ScaleHandler
from tests.service.test_server import infer_body, post_many


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


def scale(**options: Any) -> Settings:
    return settings(handler="tests.service.handlers:ScaleHandler", options=options)


def test_options_reach_the_constructor() -> None:
    (step,) = build_flow(scale(factor=3, offset=0.5)).steps
    assert isinstance(step.handler, ScaleHandler)
    assert (step.handler.factor, step.handler.offset) == (3, 0.5)


def test_options_from_the_config_file_and_the_environment() -> None:
    doc = {
        "version": 1,
        "name": "m",
        "steps": [{"name": "scale", "handler": "tests.service.handlers:ScaleHandler", "options": {"factor": 2}}],
    }
    parsed = parse_settings(doc, {"AQUEDUCT_STEPS__SCALE__OPTIONS__OFFSET": "1.5"})
    (step,) = build_flow(parsed).steps
    assert (step.handler.factor, step.handler.offset) == (2, 1.5)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            {"handler": "tests.service.handlers:ScaleHandler", "options": {"factor": 2, "scale": 3}},
            r"steps\[0\]\.options\.scale: step 'echo': .*ScaleHandler does not accept option 'scale' "
            r"\(its constructor takes: factor, offset\)",
        ),
        (
            {"handler": "tests.service.handlers:ScaleHandler", "options": {"offset": 1}},
            r"steps\[0\]\.options: step 'echo': .*ScaleHandler: missing a required argument: 'factor'",
        ),
        (  # upstream's handlers take no arguments: any option is an error, and names none accepted
            {"options": {"weights": "/models/w.pt"}},
            r"steps\[0\]\.options\.weights: step 'echo': .*EchoHandler does not accept option 'weights' "
            r"\(its constructor takes: no options\)",
        ),
    ],
)
def test_options_the_constructor_does_not_take(step: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_flow(settings(**step))


def test_option_names_must_be_identifiers() -> None:
    doc = {"version": 1, "name": "m", "steps": [{"name": "s", "handler": "a:B", "options": {"top-k": 5}}]}
    with pytest.raises(ConfigError, match=r"steps\[0\]\.options: 'top-k' does not match"):
        parse_settings(doc, {})


def test_options_reach_the_handler_in_the_serving_pod(start_server: Any) -> None:
    step = {"name": "scale", "handler": "tests.service.handlers:ScaleHandler", "options": {"factor": 3, "offset": 1}}
    server = start_server(echo_config(steps=[step]))
    reply = server.client.post("/v2/models/echo/infer", json=infer_body([1, 2]))
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert output["data"] == [4, 7]


def test_gpus_per_worker_gives_each_worker_its_own_gpu(start_server: Any) -> None:
    step = {"name": "report", "handler": "tests.service.handlers:DeviceReporter", "nprocs": 2, "gpus": "per_worker"}
    # queue_priorities 2: no batches prefetched, so concurrent requests spread over both workers
    doc = {"version": 1, "name": "echo", "steps": [step], "queue_priorities": 2, "server": {"workers": 1}}
    server = start_server(doc, env={"CUDA_VISIBLE_DEVICES": "4,7"})
    replies = asyncio.run(post_many(server.url, [infer_body([i]) for i in range(16)]))
    seen = {(r.json()["outputs"][0]["data"][0], r.json()["outputs"][1]["data"][0]) for r in replies}
    assert seen == {(0, "4"), (1, "7")}
