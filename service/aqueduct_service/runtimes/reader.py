"""``python -m aqueduct_service.runtimes.reader``: read a runtime's model metadata in a fresh process.

The pickled ``ModelRuntime`` comes on stdin; ``(ok, metadata or error message)`` goes back pickled on
stdout. What the model's library prints goes to stderr. See ``ModelRuntime.read_in_child``.
"""

from __future__ import annotations

import os
import pickle
import sys

from .base import ModelRuntime


def main() -> int:
    """Read the metadata of the runtime on stdin; write the reply on stdout."""
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the libraries' own prints must not mix with the reply
    runtime = pickle.load(sys.stdin.buffer)
    assert isinstance(runtime, ModelRuntime)
    with reply:
        pickle.dump(runtime.read_metadata_here(), reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
