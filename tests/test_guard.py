import pytest

from tasks.guard import OverfitTracker, ShareCursor, gate

SHARES = [0.1, 0.23, 0.37, 0.5]


@pytest.mark.parametrize(
    "policy, actions, expected",
    [
        ("stop", 0, "stop"),
        ("hold", 0, "hold"),
        ("back_off", 1, "back_off"),
        ("hold", 2, "stop"),  # max_guard_actions used up
        ("back_off", 2, "stop"),
    ],
)
def test_gate_acts_on_forgetting_by_policy(policy, actions, expected):
    decision = gate(2.5, 2.0, budget=0.1, on_forgetting=policy, actions_taken=actions, max_actions=2)
    assert decision.decision == expected
    assert decision.general_drift == pytest.approx(0.25)
    assert "2.5000" in decision.reason and "2.0000" in decision.reason and "+25.0%" in decision.reason


def test_gate_continues_within_budget_whatever_the_policy():
    for policy in ("stop", "hold", "back_off"):
        assert gate(2.19, 2.0, 0.1, policy).decision == "continue"


def test_cursor_moves_by_decision():
    cursor = ShareCursor(shares=SHARES)
    assert cursor.share == 0.1
    cursor = cursor.after("continue").after("continue")
    assert (cursor.share, cursor.stage) == (0.37, 3)
    held = cursor.after("hold")
    assert (held.share, held.stage, held.actions) == (0.37, 4, 1)
    backed = cursor.after("back_off")
    assert (backed.share, backed.stage, backed.actions) == (0.23, 4, 1)
    assert ShareCursor(shares=SHARES).after("back_off").share == 0.1
    assert cursor.after("stop").share is None
    done = ShareCursor(shares=SHARES, index=3).after("continue")
    assert done.share is None


def feed(tracker, curve):
    confirmed = {}
    for step, train, domain, general in curve:
        for name in tracker.update(step, train, {"domain": domain, "general": general}):
            confirmed[name] = step
    return confirmed


def test_overfitting_onset_is_where_validation_turned_up_while_training_fell():
    tracker = OverfitTracker({"domain": 2, "general": 3}, {"domain": 0.0, "general": 0.0})
    curve = [
        (10, 2.0, 1.8, 1.5),
        (20, 1.6, 1.5, 1.5),
        (30, 1.3, 1.4, 1.5),
        (40, 1.1, 1.45, 1.5),
        (50, 0.9, 1.5, 1.5),
        (60, 0.8, 1.6, 1.5),
    ]
    confirmed = feed(tracker, curve)
    assert confirmed == {"domain": 50}
    assert tracker.onsets() == {"domain": 40, "general": None}
    metrics = tracker.metrics()
    assert metrics["domain_train_val_gap"] == pytest.approx(0.8)
    assert metrics["domain_val_slope"] == pytest.approx(0.01)


def test_rising_validation_with_rising_training_is_not_overfitting():
    tracker = OverfitTracker({"domain": 1, "general": 1}, {"domain": 0.0, "general": 0.0})
    curve = [(10, 1.0, 1.0, 1.0), (20, 1.2, 1.1, 1.1), (30, 1.4, 1.2, 1.2)]
    assert feed(tracker, curve) == {}
    assert tracker.onsets() == {"domain": None, "general": None}


def test_min_delta_ignores_small_rises():
    tracker = OverfitTracker({"domain": 1, "general": 1}, {"domain": 0.05, "general": 0.0})
    curve = [(10, 1.0, 1.00, 1.0), (20, 0.9, 1.03, 0.99), (30, 0.8, 1.04, 0.98)]
    assert feed(tracker, curve) == {}
