"""The ratio schedule: the domain share of every stage, from the config's shape (pure arithmetic), and the
adaptive ramp's rule, which chooses each next share from what the last stage measured."""

from __future__ import annotations

import math

from mixtune.core.config import Schedule
from tasks.guard import ShareCursor
from tasks.records import ShareChoice, StageReport

# Raise only while more than this many stages like the last one still fit in the forgetting budget: one for
# the next stage, and one in reserve, because a raised share costs more drift than the last stage's.
RESERVE_STAGES = 2.0


def stage_shares(schedule: Schedule) -> list[float]:
    """Domain share per stage. linear: even steps; cosine: slow start and finish; step: `start` for the
    first half of the stages, `end` for the rest. adaptive: its ceiling, `start` then `end` (the fastest it
    may rise), so epoch budgets planned on it are never too small."""
    if schedule.shares is not None:
        return list(schedule.shares)
    n, start, end = schedule.stages, schedule.start, schedule.end
    if schedule.shape == "adaptive":
        return [start] + [end] * (n - 1)
    if n == 1:
        return [end]
    progress = [k / (n - 1) for k in range(n)]
    if schedule.shape == "cosine":
        progress = [(1 - math.cos(math.pi * p)) / 2 for p in progress]
    elif schedule.shape == "step":
        progress = [0.0 if k < n / 2 else 1.0 for k in range(n)]
    return [start + (end - start) * p for p in progress]


def ramp_step(schedule: Schedule) -> float:
    """One step of the linear ramp from start to end: how far the adaptive ramp lowers the share past the
    budget, and the unit its raises are counted in."""
    return (schedule.end - schedule.start) / max(schedule.stages - 1, 1)


def next_share(
    share: float,
    drift: float,
    gain: float,
    budget: float,
    schedule: Schedule,
    previous_drift: float = 0.0,
    previous_gain: float = 0.0,
) -> ShareChoice:
    """The adaptive ramp's rule (docs/training.md: Adaptive ramp). With left = budget - drift, and cost = the drift the
    last stage added but at least budget / stages (a stage whose drift fell says nothing about what a higher
    share costs), room = left / cost stages like it still fit, and the next share is
        share + step * (room - RESERVE_STAGES), at least share - step, at most end;
    past the budget it is share - step: lowered the stage after a breach, whatever the numbers. A stage that
    brought no domain gain never raises the share: more domain data bought nothing for its forgetting."""
    step, floor = ramp_step(schedule), budget / schedule.stages
    left, added, added_gain = budget - drift, drift - previous_drift, gain - previous_gain
    cost = max(added, floor)
    room = left / cost if cost > 0 else None  # a zero budget with a falling drift: only the floor, zero
    if left < 0:
        chosen, why = share - step, f"drift {drift:+.1%} is past the {budget:.0%} budget: one step lower"
    elif room is None:
        chosen, why = share, "a zero forgetting budget: held"
    else:
        chosen = min(max(share + step * (room - RESERVE_STAGES), share - step), schedule.end)
        why = f"{left:.1%} of the budget left is {room:.2f} stages like the last (cost {cost:.1%})"
    if chosen > share and added_gain <= 0:
        chosen, why = share, f"{why}; but domain gain did not grow ({added_gain:+.1%}): held"
    chosen = round(min(max(chosen, 0.0), 1.0), 4)
    return ShareChoice(
        share=chosen,
        measured_share=share,
        drift=drift,
        added_drift=added,
        cost=cost,
        budget_left=left,
        room=room,
        gain=gain,
        added_gain=added_gain,
        step=step,
        reason=f"{why} -> share {chosen:.3f}",
    )


def first_cursor(schedule: Schedule) -> ShareCursor:
    if schedule.shape == "adaptive":
        return ShareCursor(shares=[schedule.start], limit=schedule.stages)
    return ShareCursor(shares=stage_shares(schedule))


def advance(cursor: ShareCursor, report: StageReport) -> ShareCursor:
    """The cursor after a stage's gate: the fixed schedule's next share, or the adaptive ramp's choice."""
    choice = report.next_share
    if choice is None:
        return cursor.after(report.gate.decision)
    return cursor.steered(report.gate.decision, choice.share, choice.drift, choice.gain)
