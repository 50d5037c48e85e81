"""Checks that act: the forgetting guard between stages and the overfitting detector within one.

Pure logic over numbers, so every branch is testable on synthetic loss curves.
"""

from __future__ import annotations

from pydantic import BaseModel


class GateDecision(BaseModel):
    decision: str  # continue | hold | back_off | stop
    general_drift: float  # relative change of general val loss against the base model's
    reason: str


def gate(
    general_loss: float,
    base_general_loss: float,
    budget: float,
    on_forgetting: str = "stop",
    actions_taken: int = 0,
    max_actions: int = 0,
    measured_on: str = "general",
) -> GateDecision:
    drift = general_loss / base_general_loss - 1.0
    numbers = (
        f"{measured_on} val loss {general_loss:.4f} vs the base model's {base_general_loss:.4f}: "
        f"{drift:+.1%}, budget {budget:.0%}"
    )
    if drift <= budget:
        return GateDecision(decision="continue", general_drift=drift, reason=f"{numbers}; within budget")
    if on_forgetting == "stop":
        return GateDecision(decision="stop", general_drift=drift, reason=f"{numbers}; forgetting: stop")
    if actions_taken >= max_actions:
        return GateDecision(
            decision="stop",
            general_drift=drift,
            reason=(
                f"{numbers}; forgetting again after {actions_taken} {on_forgetting} action(s) "
                f"(max_guard_actions {max_actions}): stop"
            ),
        )
    action = "repeat the domain share" if on_forgetting == "hold" else "step the domain share back one stage"
    return GateDecision(decision=on_forgetting, general_drift=drift, reason=f"{numbers}; forgetting: {action}")


def kept_model(best_step: int | None, breach_step: int | None = None) -> str:
    """Which model a stage that ended early keeps, said once. Without a best checkpoint (the first evaluation
    already breached the budget) the stage keeps the model it started from, never the weights that breached."""
    if best_step is not None:
        return f"best checkpoint {'before it ' if breach_step is not None else ''}(step {best_step}) kept"
    if breach_step is not None:
        return f"no checkpoint before step {breach_step}; the stage keeps the model it started from"
    return "no checkpoint was ever best; the stage keeps its last weights"


class ShareCursor(BaseModel):
    """Where the run stands in its schedule; gate decisions move it. An adaptive ramp's shares grow one stage
    at a time (`limit` stages in all), and the cursor keeps the last stage's drift and gain, which the next
    choice is measured against (the base model's: 0)."""

    shares: list[float]
    index: int = 0
    stage: int = 1
    actions: int = 0
    limit: int | None = None
    drift: float = 0.0
    gain: float = 0.0

    @property
    def share(self) -> float | None:
        if self.limit is not None and self.stage > self.limit:
            return None
        return self.shares[self.index] if self.index < len(self.shares) else None

    def steered(self, decision: str, share: float, drift: float, gain: float) -> ShareCursor:
        """The adaptive ramp's next stage: its share is the rule's (which already lowers it past the budget),
        so a gate's hold or back_off only counts against max_guard_actions; stop still ends the run."""
        actions = self.actions + (decision in ("hold", "back_off"))
        shares = self.shares if decision == "stop" else [*self.shares, share]
        return self.model_copy(
            update={
                "shares": shares,
                "index": len(self.shares),
                "stage": self.stage + 1,
                "actions": actions,
                "drift": drift,
                "gain": gain,
            }
        )

    def after(self, decision: str) -> ShareCursor:
        index, actions = self.index, self.actions
        if decision == "continue":
            index += 1
        elif decision == "hold":
            actions += 1
        elif decision == "back_off":
            index, actions = max(index - 1, 0), actions + 1
        else:
            index = len(self.shares)
        return ShareCursor(shares=self.shares, index=index, stage=self.stage + 1, actions=actions)


class SetState(BaseModel):
    best: float | None = None
    best_step: int | None = None
    rising: int = 0  # evaluations since the best with validation up while training loss went down
    onset_step: int | None = None
    gap: float | None = None  # validation minus training loss at the last evaluation
    slope: float | None = None  # change of validation loss per step over the last two evaluations


class OverfitTracker:
    """Per validation set: best loss, train/validation gap and slope, and where overfitting began.

    Overfitting is validation loss rising (by more than min_delta over its best) while training loss falls;
    its onset is the first evaluation after the best at which that happened, confirmed after `patience`
    such evaluations."""

    def __init__(self, patience: dict[str, int], min_delta: dict[str, float]):
        self.patience, self.min_delta = patience, min_delta
        self.sets = {name: SetState() for name in patience}
        self.last: dict[str, tuple[int, float]] = {}
        self.train_at_best: dict[str, float] = {}

    def update(self, step: int, train_loss: float, losses: dict[str, float]) -> list[str]:
        """Feed one evaluation; returns the sets whose overfitting was confirmed at this step."""
        confirmed = []
        for name, loss in losses.items():
            state = self.sets[name]
            state.gap = loss - train_loss
            if name in self.last:
                last_step, last_loss = self.last[name]
                state.slope = (loss - last_loss) / max(step - last_step, 1)
            self.last[name] = (step, loss)
            if state.best is None or loss < state.best - self.min_delta[name]:
                state.best, state.best_step, state.rising = loss, step, 0
                self.train_at_best[name] = train_loss
                continue
            if loss > state.best + self.min_delta[name] and train_loss < self.train_at_best[name]:
                state.rising += 1
                if state.rising == 1:
                    state.onset_step = step
                if state.rising == self.patience[name]:
                    confirmed.append(name)
        return confirmed

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, s in self.sets.items():
            if s.gap is not None:
                out[f"{name}_train_val_gap"] = s.gap
            if s.slope is not None:
                out[f"{name}_val_slope"] = s.slope
        return out

    def onsets(self) -> dict[str, int | None]:
        """The onset step of every set whose rise lasted `patience` evaluations."""
        return {name: s.onset_step if s.rising >= self.patience[name] else None for name, s in self.sets.items()}
