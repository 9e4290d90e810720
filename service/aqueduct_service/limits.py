"""Bounds on what one request may make the pod do: free-form JSON values and the bytes decoded at once.

A request's ``parameters`` (and a tensor's) are free-form JSON that travels with the task to the
workers (pickled): at most ``MAX_FREE_FORM_DEPTH`` levels deep and about ``MAX_FREE_FORM_BYTES``
of JSON, else 400. Bodies being read and decoded are counted against a byte budget per HTTP
process (``server.decode_budget_bytes`` split among the front ends); a request that would go
beyond it, while another is being decoded, gets 503 with ``Retry-After``.
"""

from __future__ import annotations

from typing import Any

from .errors import RETRY_AFTER_SECONDS, InferenceError

#: Request bodies (gRPC: raw contents) at least this large are read into shared memory, where the front end
#: has an arena: their tensors reach the workers without another copy.
LEASE_MIN_BYTES = 64 * 1024
#: Bodies (gRPC: messages) at least this large are decoded in a thread, so the event loop keeps answering
#: (probes too).
THREAD_DECODE_BYTES = 1024 * 1024
MAX_FREE_FORM_DEPTH = 32
MAX_FREE_FORM_BYTES = 64 * 1024
_NUMBERS = (bool, int, float, type(None))


def check_free_form(value: Any, where: str) -> None:
    """Refuse (400) a JSON value nested deeper than ``MAX_FREE_FORM_DEPTH`` or larger than ``MAX_FREE_FORM_BYTES``.

    Walks without recursion, so no value can exhaust the interpreter's stack here; the size is
    reckoned as JSON text (strings and keys by length, every other scalar as 8 bytes).
    """
    flat = isinstance(value, dict) and len(value) < 64 and all(type(v) in _NUMBERS for v in value.values())
    if flat and sum(map(len, value)) < MAX_FREE_FORM_BYTES // 2:  # as parameters mostly are
        return
    size = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_FREE_FORM_DEPTH:
                raise InferenceError(400, f"{where}: nested deeper than the limit of {MAX_FREE_FORM_DEPTH} levels")
            size += 2
            if isinstance(item, dict):
                size += sum(len(key) + 3 for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                size += len(item)
                stack.extend((child, depth + 1) for child in item)
        else:
            size += len(item) + 2 if isinstance(item, str) else 8
        if size > MAX_FREE_FORM_BYTES:
            raise InferenceError(400, f"{where}: larger than the limit of {MAX_FREE_FORM_BYTES} bytes of JSON")


class DecodeBudget:
    """Bytes of request bodies one HTTP process is reading and decoding at once, at most ``limit``.

    One request is always let in when nothing else is being decoded (whatever its size: the body
    limit bounds it), so a budget below ``max_body_bytes`` never locks large requests out.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int) -> None:
        """Count ``nbytes`` more; 503 with ``Retry-After`` when they would go beyond the budget."""
        if self.used and self.used + nbytes > self.limit:
            raise InferenceError(
                503,
                f"the server is decoding {self.used} bytes of request bodies; {nbytes} more would go beyond its "
                f"budget of {self.limit} (server.decode_budget_bytes): retry later",
                {"Retry-After": RETRY_AFTER_SECONDS},
            )
        self.used += nbytes

    def hold(self, nbytes: int) -> BudgetHold:
        """Take ``nbytes`` for one request (503 beyond the budget); the hold may grow, and gives all back at once."""
        hold = BudgetHold(self)
        hold.take(nbytes)
        return hold


class BudgetHold:
    """What one request holds of a ``DecodeBudget``."""

    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.nbytes = 0

    def take(self, nbytes: int) -> None:
        """Hold ``nbytes`` more (503 beyond the budget)."""
        self.budget.take(nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        """Give back all this request holds (again: nothing)."""
        self.budget.used -= self.nbytes
        self.nbytes = 0
