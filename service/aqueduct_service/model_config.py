"""Triton's model configuration (``GET /v2/models/{name}/config``), as tritonclient's ``get_model_config`` reads it.

The pod's settings in the fields of Triton's ``ModelConfig`` (its JSON form): ``max_batch_size`` is
the first step's ``batch_size`` when requests carry rows (``batch_dim``), else 0 (requests have no
batch dimension, and ``dims`` are the whole shapes); ``dynamic_batching`` says how the first step
gathers requests (``batch_size``, ``batch_timeout``, the queue's size, priorities and deadline);
``instance_group`` has one entry per step (its ``nprocs`` workers); the steps' own settings are in
the model metadata's ``parameters`` (``GET /v2/models/{name}``).
"""

from __future__ import annotations

from typing import Any

from .settings import Settings, TensorSpec


def triton_model_config(settings: Settings) -> dict[str, Any]:
    """The model configuration of the pod described by ``settings``."""
    batched = bool(settings.batch_dim)
    first = settings.steps[0]
    queue_policy: dict[str, Any] = {
        "timeout_action": "REJECT",
        "default_timeout_microseconds": round(settings.timeout * 1e6),
        "allow_timeout_override": True,
        "max_queue_size": settings.queue_size or 0,
    }
    return {
        "name": settings.name,
        "platform": settings.platform,
        "backend": "aqueduct",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": first.batch_size if batched else 0,
        "input": [_tensor(spec, batched) for spec in settings.inputs],
        "output": [_tensor(spec, batched) for spec in settings.outputs],
        "dynamic_batching": {
            "preferred_batch_size": [first.batch_size],
            "max_queue_delay_microseconds": round(first.batch_timeout * 1e6),
            "preserve_ordering": False,
            "priority_levels": settings.queue_priorities if settings.queue_priorities > 1 else 0,
            "default_priority_level": 0,
            "default_queue_policy": queue_policy,
        },
        "instance_group": [{"name": step.name, "kind": "KIND_AUTO", "count": step.nprocs} for step in settings.steps],
    }


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    """A tensor as Triton declares it: ``TYPE_*`` datatype, ``dims`` without the batch dimension."""
    return {
        "name": spec.name,
        "data_type": "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}",
        "dims": list(spec.shape[1:] if batched else spec.shape),
    }
