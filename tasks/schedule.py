"""The ratio schedule: the domain share of every stage, from the config's shape (pure arithmetic)."""

from __future__ import annotations

import math

from mixtune.core.config import Schedule


def stage_shares(schedule: Schedule) -> list[float]:
    """Domain share per stage. linear: even steps; cosine: slow start and finish; step: `start` for the
    first half of the stages, `end` for the rest."""
    if schedule.shares is not None:
        return list(schedule.shares)
    n, start, end = schedule.stages, schedule.start, schedule.end
    if n == 1:
        return [end]
    progress = [k / (n - 1) for k in range(n)]
    if schedule.shape == "cosine":
        progress = [(1 - math.cos(math.pi * p)) / 2 for p in progress]
    elif schedule.shape == "step":
        progress = [0.0 if k < n / 2 else 1.0 for k in range(n)]
    return [start + (end - start) * p for p in progress]
