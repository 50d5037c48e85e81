"""The adaptive ramp's rule on synthetic drift sequences: it raises while the budget has room, holds or lowers
as drift nears the budget, and reacts the stage after a breach, so drift never passes the budget by more than
the one stage that crossed it."""

import pytest

from mixtune.core.config import ConfigError, Schedule
from tasks.schedule import first_cursor, next_share, ramp_step, stage_shares
from tests.conftest import tiny_config

BUDGET, END = 0.1, 0.5
SCHEDULE = Schedule(start=0.1, end=END, stages=5, shape="adaptive")  # a step of 0.1; a stage costs >= 2% drift


def choose(share, drift, previous_drift=0.0, gain=0.5, previous_gain=0.2):
    return next_share(share, drift, gain, BUDGET, SCHEDULE, previous_drift=previous_drift, previous_gain=previous_gain)


def test_raises_by_the_room_the_budget_leaves():
    # 6% left, the last stage added 2%: room for 3 such stages, one step more than the two kept in reserve
    choice = choose(0.2, 0.04, previous_drift=0.02)
    assert choice.room == pytest.approx(3.0) and choice.share == pytest.approx(0.3)
    cheap = choose(0.2, 0.02, previous_drift=0.01)  # a stage is counted as costing at least budget / stages
    assert (cheap.cost, cheap.room, cheap.share) == pytest.approx((0.02, 4.0, 0.4))
    assert choose(0.1, -0.2, previous_drift=-0.1).share == END  # 30% of budget left: 15 stages' room
    assert choose(0.45, 0.0, previous_drift=-0.01).share == END  # never past end


def test_holds_when_two_stages_like_the_last_fill_the_budget():
    choice = choose(0.3, 0.06, previous_drift=0.04)
    assert choice.room == pytest.approx(2.0) and choice.share == pytest.approx(0.3)
    assert "stages like the last" in choice.reason


def test_holds_instead_of_raising_when_the_domain_stopped_gaining():
    choice = choose(0.2, 0.01, previous_drift=0.0, gain=0.3, previous_gain=0.3)
    assert choice.share == pytest.approx(0.2) and "domain gain did not grow" in choice.reason


def test_lowers_as_drift_nears_the_budget_and_one_step_past_it():
    near = choose(0.4, 0.08, previous_drift=0.06)  # room 1: half a stage short of the reserve
    assert near.share == pytest.approx(0.3)
    assert choose(0.4, 0.095, previous_drift=0.05).share == pytest.approx(0.3)  # never more than one step a stage
    past = choose(0.4, 0.13, previous_drift=0.09)
    assert past.share == pytest.approx(0.3) and "past the 10% budget" in past.reason
    assert choose(0.05, 0.2, previous_drift=0.25).share == 0.0  # drift falling but still past: lowered, not below 0


def ramp(sensitivity: float, pull: float, stages: int = 8, start: float = 0.1) -> list[tuple[float, float, float]]:
    """A synthetic model whose general drift moves each stage by `pull` of the way toward sensitivity * share
    (more domain data, more forgetting; general data pulls it back), and whose domain gain keeps growing.
    Returns (share, drift before, drift after) per stage."""
    schedule = Schedule(start=start, end=END, stages=stages, shape="adaptive")
    share, drift, gain, history = start, 0.0, 0.0, []
    for _ in range(stages):
        after = drift + pull * (sensitivity * share - drift)
        history.append((share, drift, after))
        choice = next_share(share, after, gain + 0.05, BUDGET, schedule, previous_drift=drift, previous_gain=gain)
        share, drift, gain = choice.share, after, gain + 0.05
    return history


@pytest.mark.parametrize("sensitivity", [0.05, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("pull", [0.3, 0.6, 1.0])
def test_drift_never_passes_the_budget_by_more_than_the_stage_that_crossed_it(sensitivity, pull):
    history = ramp(sensitivity, pull)
    step = ramp_step(Schedule(start=0.1, end=END, stages=8, shape="adaptive"))
    crossing = None
    for k, (share, before, after) in enumerate(history):
        if after <= BUDGET:
            crossing = None
            continue
        crossing = crossing if crossing is not None else after - before  # the drift the crossing stage added
        assert after - BUDGET <= crossing + 1e-12, history
        if k + 1 < len(history):  # reacted the very next stage: at least one step lower (or all general)
            assert history[k + 1][0] <= max(share - step, 0.0) + 1e-4, history  # shares: 4 decimals


def test_a_model_that_barely_forgets_is_raised_to_end_and_one_that_forgets_fast_is_held_low():
    assert [round(s, 4) for s, _, _ in ramp(0.05, 0.6)][-1] == END
    shares = [s for s, _, _ in ramp(0.3, 0.6)]
    assert max(shares) < END and max(after for _, _, after in ramp(0.3, 0.6)) <= BUDGET


def test_the_cursor_runs_exactly_the_configured_stages_on_the_ramps_choices():
    cursor = first_cursor(Schedule(start=0.1, end=0.5, stages=3, shape="adaptive"))
    assert (cursor.share, cursor.stage) == (0.1, 1)
    cursor = cursor.steered("continue", 0.3, drift=0.02, gain=0.4)
    assert (cursor.share, cursor.stage, cursor.drift, cursor.gain, cursor.actions) == (0.3, 2, 0.02, 0.4, 0)
    held = cursor.steered("hold", 0.2, drift=0.12, gain=0.5)  # the gate's hold counts; the share is the rule's
    assert (held.share, held.stage, held.actions) == (0.2, 3, 1)
    assert held.after("continue").share is None  # three stages, as configured
    assert cursor.steered("stop", 0.2, drift=0.2, gain=0.5).share is None
    fixed = first_cursor(Schedule(start=0.1, end=0.5, stages=3))
    assert fixed.shares == pytest.approx([0.1, 0.3, 0.5]) and fixed.limit is None


def test_adaptive_plans_on_its_ceiling_and_refuses_a_share_list_or_a_falling_ramp(tmp_path):
    assert stage_shares(Schedule(start=0.1, end=0.5, stages=4, shape="adaptive")) == [0.1, 0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"schedule: .*give shares or shape adaptive"):
        tiny_config(tmp_path, schedule={"shape": "adaptive", "shares": [0.1, 0.2]})
    with pytest.raises(ConfigError, match=r"schedule: .*end 0.1 < 0.5"):
        tiny_config(tmp_path, schedule={"shape": "adaptive", "start": 0.5, "end": 0.1})


def test_plan_auto_replaces_an_adaptive_schedule_with_the_advice_unless_the_advisor_ramps_adaptively(tmp_path):
    from tasks.plan import advise, apply_advice

    config = tiny_config(tmp_path, schedule={"shape": "adaptive"})
    fixed = apply_advice(config, advise(20_000, 100_000, 0, config))  # full SFT, the advisor's linear ramp
    assert fixed.schedule.shape == "linear" and fixed.schedule.shares == pytest.approx([0.1, 0.2333, 0.3667, 0.5], 1e-3)
    config = tiny_config(tmp_path, advisor={"schedule": {"shape": "adaptive", "stages": 5}})
    ramped = apply_advice(config, advise(20_000, 100_000, 0, config))
    assert (ramped.schedule.shape, ramped.schedule.stages, ramped.schedule.shares) == ("adaptive", 5, None)


def test_the_adaptive_ramp_may_rise_to_domain_only_unless_given_a_ceiling():
    assert Schedule(shape="adaptive").end == 1.0
    assert Schedule(shape="adaptive", end=0.5).end == 0.5  # a user's ceiling is kept
    assert Schedule().end == Schedule(shape="cosine").end == 0.5  # the fixed ramps keep MiniMind's 10% -> 50%
