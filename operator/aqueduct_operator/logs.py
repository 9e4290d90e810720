"""The operator's log: kopf's handler on stderr, as JSON lines in a container or plain text on a terminal.

A JSON line has the serving pod's fields (``time``, ``level``, ``logger``, ``message``) and, for a record
about a Pipeline, ``object`` (its apiVersion, kind, namespace, name and uid). Formatting is python-json-logger's.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any

import kopf
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

FORMATS = ("auto", "json", "text")
_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}
#: kopf's own record attributes: ``k8s_ref`` becomes ``object``, the rest are not for the log.
_RESERVED = (*RESERVED_ATTRS, "k8s_ref", "k8s_skip", "settings")


class _JsonFormatter(JsonFormatter):
    """Time in ISO 8601 (UTC, milliseconds); kopf's object reference as ``object``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        ref = getattr(record, "k8s_ref", None)
        if ref:
            log_record["object"] = ref


def configure_logging(log_format: str, verbose: bool, debug: bool) -> None:
    """kopf's logging, with JSON lines for ``json`` (or ``auto`` when stderr is no terminal)."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    root = logging.getLogger()
    before = set(root.handlers)
    kopf.configure(verbose=verbose, debug=debug, log_prefix=log_format == "text")
    if log_format == "json":
        formatter = _JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields=_RENAMED, reserved_attrs=_RESERVED
        )
        for handler in root.handlers:
            if handler not in before:  # kopf's
                handler.setFormatter(formatter)
    logging.getLogger("aqueduct_operator").setLevel(logging.DEBUG if debug else logging.INFO)
