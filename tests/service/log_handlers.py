"""A handler that logs and answers each task's request id (served by ``test_logs.py``)."""

from __future__ import annotations

import logging

import numpy as np
from aqueduct_service import InferenceTask

from tests.service.handlers import EchoHandler

log = logging.getLogger("tests.handler")


class RequestIdHandler(EchoHandler):
    """``EchoHandler`` (``sleep``, poison and crash included), answering ``request_id`` too and logging it."""

    def handle(self, *tasks: InferenceTask) -> None:
        super().handle(*tasks)
        for task in tasks:
            log.warning("handled the task", extra={"request_id": task.request_id})
            task.outputs["request_id"] = np.array([(task.request_id or "").encode()])
