"""Which GPU a worker sees, and the environment a worker starts with.

With ``FlowStep(gpu_per_worker=True)``, worker *i* of the step sees one GPU, number *i mod G* of
the G GPUs the flow's process sees: ``CUDA_VISIBLE_DEVICES`` is set in the worker before
``on_start``, so the framework there sees it as ``cuda:0``. The GPUs the process sees are those in
its own ``CUDA_VISIBLE_DEVICES``, else one per ``/dev/nvidiaN`` device (in a Kubernetes container,
the GPUs the pod was given). CUDA must not be initialised in the process that forks the workers: a
forked child cannot use it (models are built in ``on_start``, in the worker).
"""

from __future__ import annotations

import os
import re
import sys

from ..exceptions import FlowStartError

_DEVICE = re.compile(r"^nvidia[0-9]+$")
WORKER_INDEX_ENV = "AQUEDUCT_WORKER_INDEX"


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and not gpu.strip().startswith("-")]
    try:
        count = sum(1 for name in os.listdir("/dev") if _DEVICE.match(name))
    except OSError:
        count = 0
    return [str(i) for i in range(count)]


def worker_environment(slot: int, gpu_per_worker: bool) -> dict[str, str]:
    """Variables set in the step's worker number ``slot`` before its ``on_start``."""
    env = {WORKER_INDEX_ENV: str(slot)}
    if gpu_per_worker:
        gpus = visible_gpus()
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def check_cuda_not_initialised() -> None:
    """Raise ``FlowStartError`` if this process initialised CUDA (its forked workers could not use it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise FlowStartError(
            "CUDA was initialised in the flow's process before the workers start: a forked worker cannot use "
            "it. Build the model and move it to the GPU in the handler's on_start() (which runs in each "
            "worker), not in its constructor or at import time; or start the flow with mp_start_method='spawn'"
        )
