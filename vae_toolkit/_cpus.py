"""The CPUs this process may use: its affinity mask, lowered to a cgroup v2 CPU quota (a container's or SLURM's).

:func:`available_cpus` is re-exported by :mod:`vae_toolkit.image_utils` (its public home) and sizes the
decoding threads of ``load_images``, ``encode`` and ``evaluate``.
"""

from __future__ import annotations

import math
import os


def available_cpus() -> int:
    """The number of CPUs this process may use: the default number of image decoding threads.

    The CPU affinity mask (``os.sched_getaffinity``, which ``taskset``, cpusets and job schedulers set) where
    the platform has one, else ``os.cpu_count()``; lowered to a cgroup v2 CPU quota (``cpu.max``, what
    ``docker --cpus`` and Kubernetes CPU limits set) when there is one; never less than 1. PIL releases the
    GIL while decoding and resizing, and numpy while converting, so one decoding thread per available CPU
    keeps them all busy.
    """
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        try:
            count = len(os.sched_getaffinity(0))
        except OSError:  # some sandboxes refuse the call
            pass
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


_CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def _cgroup_cpu_quota() -> int | None:
    """CPUs the cgroup v2 quota allows (``"200000 100000"`` -> 2, rounded up); None when unlimited or unknown."""
    try:
        with open(_CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None
