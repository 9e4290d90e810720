"""Liveness and readiness: the process answers; the flow runs with every worker alive and not draining."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aqueduct import FlowHealth


class ServingState:
    """What the pod knows beyond the flow: whether it drains (SIGTERM seen) and why the flow failed to start."""

    def __init__(self) -> None:
        self._draining_since: float | None = None
        self.start_error: BaseException | None = None

    @property
    def draining(self) -> bool:
        """SIGTERM seen (or the main process gone): not ready, new requests refused."""
        return self._draining_since is not None

    @draining.setter
    def draining(self, value: bool) -> None:
        if not value:
            self._draining_since = None
        elif self._draining_since is None:
            self._draining_since = time.monotonic()

    def drain_left(self, graceful_timeout: float) -> float:
        """Seconds left of ``graceful_timeout`` since draining began (all of it when not draining)."""
        if self._draining_since is None:
            return graceful_timeout
        return max(0.0, graceful_timeout - (time.monotonic() - self._draining_since))

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
