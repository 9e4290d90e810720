"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's limit)."""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def available_cpus() -> float:
    """CPUs this process may use: ``os.sched_getaffinity``, capped by the cgroup's CPU quota when set.

    In a Kubernetes pod with ``resources.limits.cpu: 4`` on a 64-core node this is 4, not 64.
    The result may be fractional (a limit of 1500m gives 1.5).
    """
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


def _cgroup_quota() -> float | None:
    """The CPU quota in CPUs: cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    try:
        quota, period = (_CGROUP / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1e-3, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((_CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((_CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
