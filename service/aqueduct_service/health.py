"""Liveness and readiness: the process answers; the flow runs with every worker alive and not draining."""

from __future__ import annotations

import dataclasses
from typing import Any

from aqueduct import FlowHealth


class ServingState:
    """What the pod knows beyond the flow: whether it drains (SIGTERM seen) and why the flow failed to start."""

    def __init__(self) -> None:
        self.draining = False
        self.start_error: BaseException | None = None

    def readiness(self, health: FlowHealth) -> tuple[bool, dict[str, Any]]:
        """(ready, detail) given the flow's health: ready when not draining, the flow started and every
        step has all its workers."""
        ready = bool(health.ready) and not self.draining and self.start_error is None
        detail: dict[str, Any] = {
            "ready": ready,
            "state": str(health.state),
            "draining": self.draining,
            "steps": [dataclasses.asdict(step) for step in health.steps],
        }
        if self.start_error is not None:
            detail["start_error"] = f"{type(self.start_error).__name__}: {self.start_error}"
        return ready, detail
