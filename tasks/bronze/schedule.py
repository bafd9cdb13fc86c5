"""How many units bronze ingests at once, and each unit's share of the run's row budget.

Plain module (no Prefect): the bronze flow submits the units this schedule picks to a
ThreadPoolTaskRunner of `concurrency` threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota if any."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota() -> int | None:
    """The cgroup v2 (cpu.max) or v1 (cfs_quota/period) CPU limit, rounded up; None if none."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def wave_shares(budget: int | None, units: int, concurrency: int) -> list[int | None]:
    """Row budgets of the next wave of units, in unit order (deterministic).

    Without a budget every unit goes in one wave (the runner's threads bound how many run at
    once). With one, the next `concurrency` units share it evenly (the first ones get the
    remainder); a wave never gets more units than rows of budget.
    """
    if budget is None:
        return [None] * units
    n = min(units, concurrency, budget)
    if n <= 0:
        return []
    base, extra = divmod(budget, n)
    return [base + (1 if i < extra else 0) for i in range(n)]
