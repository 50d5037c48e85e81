"""Where a stage's wall time goes: its optimizer steps, its evaluations, and what it does around them (model
load, trainer set-up, checkpoint writes, the final model, MLflow), said once when the stage ends."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STEPS, EVALUATION = "steps", "evaluation"


class StageTime:
    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began

    def timed(self, name: str, call: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            with self.phase(name):
                return call(*args, **kwargs)

        return timed_call

    def split(self, step_seconds: float) -> dict[str, float]:
        """Seconds per phase since the stage began; `other`: what no phase covers (between steps: batches
        collated, callbacks, progress lines)."""
        wall = time.perf_counter() - self.started
        phases = {STEPS: step_seconds, **self.seconds}
        return {**phases, "other": max(0.0, wall - sum(phases.values())), "wall": wall}

    def line(self, label: str, step_seconds: float) -> str:
        split = self.split(step_seconds)
        wall = split.pop("wall")
        around = wall - split[STEPS] - split.get(EVALUATION, 0.0)
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in split.items())
        share = f"{around:.1f} s of {wall:.1f} s ({around / wall:.1%})"
        return f"{label} time: {parts}; outside steps and evaluation {share}"
