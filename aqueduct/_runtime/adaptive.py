"""An adaptive batch window: wait for a fuller batch only while it pays and the latency target allows.

The step learns two things as it runs: how fast tasks arrive (an exponentially decaying count)
and what a batch costs, ``handle(n) ≈ fixed + per_task * n`` (least squares over recent batches).
A free worker with a partial batch then waits until the earliest of: the batch would fill at the
current arrival rate; the oldest task would miss ``target`` if the batch gathered by then were
handled after the wait. It does not wait at all when less than one more task is expected in that time, so a
quiet step answers at once and a busy one batches.

Arrival rates mislead with closed-loop callers (each waits for its answer before sending the next
task): waiting then brings nothing however high the rate looks. So the window also checks what its
waits really gained; when recent waits gathered less than one task on average it stops waiting,
and tries again once every ``_PROBE_EVERY`` batches.
"""

from __future__ import annotations

import math
from collections import deque

_RATE_TAU_S = 0.5
_SAMPLES = 64
#: Plan for this share of the target: timers, scheduling and the cost model are not exact.
_HEADROOM = 0.8
_PROBE_EVERY = 20


class AdaptiveWindow:
    """Decides how long a free worker waits for a fuller batch, given a latency target in seconds."""

    def __init__(self, target: float) -> None:
        self.target = target
        self._level = 0.0
        self._last_arrival = 0.0
        self._samples: deque[tuple[int, float]] = deque(maxlen=_SAMPLES)
        self._gain = 1.0  # tasks a wait gathered, recent average
        self._wait_from: int | None = None  # tasks waiting when the current wait began
        self._since_probe = 0

    def arrived(self, now: float) -> None:
        """Count one task arriving at the step."""
        if self._last_arrival:
            self._level *= math.exp(-(now - self._last_arrival) / _RATE_TAU_S)
        self._level += 1.0
        self._last_arrival = now

    def rate(self, now: float) -> float:
        """Recent arrivals per second."""
        if not self._last_arrival:
            return 0.0
        return self._level * math.exp(-(now - self._last_arrival) / _RATE_TAU_S) / _RATE_TAU_S

    def dispatched(self, waiting: int) -> None:
        """A free worker takes a batch now, with ``waiting`` tasks queued: score the wait that led here."""
        if self._wait_from is not None:
            self._gain = 0.8 * self._gain + 0.2 * (waiting - self._wait_from)
            self._wait_from = None
            self._since_probe = 0
        else:
            self._since_probe += 1

    def handled(self, size: int, seconds: float) -> None:
        """Record what a batch of ``size`` tasks cost."""
        self._samples.append((size, seconds))

    def model(self) -> tuple[float, float]:
        """``(fixed, per_task)`` seconds of ``handle(n) ≈ fixed + per_task * n``, fitted to recent batches."""
        samples = self._samples
        if not samples:
            return 0.0, 0.0
        n = len(samples)
        mean_x = sum(s for s, _ in samples) / n
        mean_y = sum(t for _, t in samples) / n
        var = sum((s - mean_x) ** 2 for s, _ in samples)
        if var == 0:  # one batch size seen so far: no way to tell fixed from per-task cost
            return mean_y, 0.0
        slope = max(sum((s - mean_x) * (t - mean_y) for s, t in samples) / var, 0.0)
        return max(mean_y - slope * mean_x, 0.0), slope

    def dispatch_at(self, now: float, oldest: float, waiting: int, batch_size: int) -> float:
        """When to hand the waiting tasks to a free worker (``<= now``: at once).

        Waiting until ``t`` gathers ``k(t) = waiting + rate * (t - now)`` tasks, which finish at
        ``t + fixed + per_task * k(t)``; the latest ``t`` that keeps the oldest task within the
        target solves that for ``oldest + target``.
        """
        rate = self.rate(now)
        if rate <= 0 or (self._gain < 1.0 and self._since_probe < _PROBE_EVERY and self._wait_from is None):
            return now
        fixed, per_task = self.model()
        latest = (oldest + self.target * _HEADROOM - fixed - per_task * waiting + per_task * rate * now) / (
            1 + per_task * rate
        )
        if latest <= now or rate * (latest - now) < 1.0:
            return now
        due = min(latest, now + (batch_size - waiting) / rate)
        if self._wait_from is None:
            self._wait_from = waiting
        return due
