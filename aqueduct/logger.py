"""The engine's logger (upstream exports it as ``aqueduct.log``)."""

import logging

log = logging.getLogger("aqueduct")
