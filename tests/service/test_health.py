"""Readiness: the flow's health, minus draining and failed starts."""

from __future__ import annotations

from typing import Any

from aqueduct_service.health import ServingState

from aqueduct import FlowHealth, StepHealth


class StubFlow:
    def __init__(self, alive: int) -> None:
        self.alive = alive

    def health(self) -> FlowHealth:
        pids = (10, 11)[: self.alive]
        step = StepHealth(name="s", expected=2, alive=self.alive, restarts=0, pids=pids, queue_depth=0)
        return FlowHealth(state="running", steps=(step,))


def health(flow: Any, state: ServingState) -> tuple[bool, dict[str, Any]]:
    return state.readiness(flow.health())


def test_ready_needs_a_live_worker_of_every_step() -> None:
    state = ServingState()
    ready, detail = health(StubFlow(alive=2), state)
    assert ready and detail["steps"][0]["pids"] == (10, 11)
    assert health(StubFlow(alive=1), state)[0]  # one of two: still serving while the other is replaced
    assert not health(StubFlow(alive=0), state)[0]


def test_draining_and_start_errors_are_not_ready() -> None:
    state = ServingState()
    state.draining = True
    ready, detail = health(StubFlow(alive=2), state)
    assert not ready and detail["draining"]
    state = ServingState()
    state.start_error = RuntimeError("on_start blew up")
    ready, detail = health(StubFlow(alive=2), state)
    assert not ready and detail["start_error"] == "RuntimeError: on_start blew up"
