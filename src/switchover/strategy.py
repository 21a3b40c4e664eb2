"""Which hosts switch together: the batches of a deploy strategy. Pure logic."""

from __future__ import annotations

import math
from collections.abc import Sequence

from switchover.errors import UsageError


def batch_count(batch_size: int | str, total: int) -> int:
    """Hosts per batch: a number, or a percentage of the fleet (rounded up, at least 1)."""
    if isinstance(batch_size, str):
        pct = int(batch_size.rstrip("%"))
        return max(1, math.ceil(total * pct / 100))
    return max(1, batch_size)


def plan_batches(
    strategy: str,
    names: Sequence[str],
    batch_size: int | str = 1,
    canary_hosts: int | Sequence[str] = 1,
) -> list[list[int]]:
    """Indices into `names`, batch by batch, in the order they switch.

    all: one batch. rolling: batches of `batch_size`. canary: the canary hosts first (a
    count from the front of the list, or hosts named), then everyone else at once.
    """
    n = len(names)
    if n == 0:
        return []
    if strategy == "all":
        return [list(range(n))]
    if strategy == "rolling":
        size = batch_count(batch_size, n)
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if strategy == "canary":
        if isinstance(canary_hosts, int):
            first = list(range(min(canary_hosts, n)))
        else:
            unknown = [c for c in canary_hosts if c not in names]
            if unknown:
                raise UsageError(f"canary host(s) not in this deploy: {', '.join(unknown)}")
            first = [names.index(c) for c in canary_hosts]
        rest = [i for i in range(n) if i not in first]
        return [first, rest] if rest else [first]
    raise UsageError(f"unknown strategy {strategy!r} (all, rolling, canary)")
