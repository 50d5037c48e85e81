"""Trainer callbacks: progress lines (and the same numbers to MLflow), the live progress bar (LiveBar, also
used outside training), evaluation at the last step, the sampler's position in every checkpoint, the
overfitting watch and the stage's peak memory."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from mixtune.core.cache import file_digest
from mixtune.core.logs import logs_above
from tasks.guard import OverfitTracker
from tasks.mlflow_names import Metric, val_loss


class ProgressCallback(TrainerCallback):
    """One line per logging step with loss, learning rate and tokens/s; also hands the same numbers to `sink`
    (MLflow) so the console and the tracking server never disagree.

    Throughput counts only time inside training steps, so evaluations and checkpoint saves do not dilute it."""

    def __init__(self, label: str, log: Callable[[str], None], sink: Callable[[dict, int], None] | None = None):
        self.label, self.log, self.sink = label, log, sink
        self.step_started = 0.0
        self.train_seconds = self.window_seconds = 0.0
        self.first_tokens = self.window_tokens = 0
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the state already counts the tokens of the earlier attempt.
        self.first_tokens = self.window_tokens = self.last_tokens = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.step_started
        self.train_seconds += elapsed
        self.window_seconds += elapsed
        self.last_tokens = state.num_input_tokens_seen

    @property
    def tokens_per_second(self) -> float:
        return (self.last_tokens - self.first_tokens) / max(self.train_seconds, 1e-9)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = rename_metrics(logs or {})
        if Metric.TRAIN_LOSS in metrics:
            seen = state.num_input_tokens_seen
            metrics[Metric.TOKENS_PER_SECOND] = (seen - self.window_tokens) / max(self.window_seconds, 1e-9)
            self.window_tokens, self.window_seconds = seen, 0.0
        if not metrics:
            return
        shown = " ".join(f"{SHORT_NAMES.get(k, k)} {v:.4g}" for k, v in metrics.items())
        self.log(f"{self.label} step {state.global_step}/{state.max_steps} {shown}")
        if self.sink:
            self.sink(metrics, state.global_step)


class LiveBar:
    """A transient progress bar with the time left, on a terminal only; elsewhere (CI, log files, a Prefect
    worker) nothing, and the log lines carry the numbers. While it is drawn, log lines print above it."""

    drawn = False  # one live display at a time: a bar asked for inside another one stays silent

    def __init__(self, label: str, total: int, completed: int = 0, stream=None):
        self.label, self.total, self.completed = label, total, completed
        self.stream = stream or sys.stderr
        self.bar = self.routing = None

    def __enter__(self) -> LiveBar:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if LiveBar.drawn or not self.stream.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=self.stream)  # the terminal's width: log lines print through it while it draws
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[numbers]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            speed_estimate_period=600,  # rich's 30 s shows no time left at all once a step takes longer
        )
        self.task = self.bar.add_task(self.label, total=self.total, completed=self.completed, numbers="")
        self.routing = logs_above(console)
        self.routing.__enter__()
        self.bar.start()
        LiveBar.drawn = True

    def update(self, completed: int | None = None, advance: int = 0, numbers: str | None = None) -> None:
        if self.bar is None:
            return
        fields = {} if numbers is None else {"numbers": numbers}
        self.bar.update(self.task, completed=completed, advance=advance or None, **fields)

    def advance(self, steps: int) -> None:
        self.update(advance=steps)

    def stop(self) -> None:
        if self.bar is None:
            return
        self.bar.stop()
        self.routing.__exit__(None, None, None)
        self.bar = self.routing = None
        LiveBar.drawn = False


class LiveProgress(TrainerCallback):
    """A LiveBar while a model trains: the label (pre-training, stage k/N), step, loss, both validation
    losses, tokens/s and time left."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream
        self.bar: LiveBar | None = None
        self.shown: dict[str, float] = {}
        self.started = self.seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = LiveBar(self.label, state.max_steps, state.global_step, self.stream)
        self.bar.start()
        self.started, self.seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        rate = (state.num_input_tokens_seen - self.seen) / max(time.perf_counter() - self.started, 1e-9)
        self.shown["tok/s"] = rate
        if self.bar is not None:
            self.bar.update(completed=state.global_step, numbers=self.numbers())

    def on_log(self, args, state, control, logs=None, **kwargs):
        names = {
            Metric.TRAIN_LOSS: "loss",
            Metric.DOMAIN_VAL_LOSS: "domain val",
            Metric.GENERAL_VAL_LOSS: "general val",
        }
        self.shown.update({names[k]: v for k, v in rename_metrics(logs or {}).items() if k in names})

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Also called when training raised (TokenLossTrainer.train): a crashed step never reaches on_train_end,
        and a bar left drawn would keep the terminal's log lines routed through it."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def numbers(self) -> str:
        return "  ".join(f"{k} {v:.0f}" if k == "tok/s" else f"{k} {v:.3f}" for k, v in self.shown.items())


# On screen, where a Prefect log line's prefix already takes half of 120 columns; MLflow keeps the long names.
SHORT_NAMES = {
    Metric.TRAIN_LOSS: "loss",
    "learning_rate": "lr",
    "grad_norm": "grad",
    Metric.TOKENS_PER_SECOND: "tok/s",
    Metric.DOMAIN_VAL_LOSS: "domain val",
    Metric.GENERAL_VAL_LOSS: "general val",
}

METRIC_NAMES = {  # Trainer's log names -> MLflow's
    "loss": Metric.TRAIN_LOSS,
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "eval_domain_loss": Metric.DOMAIN_VAL_LOSS,
    "eval_general_loss": Metric.GENERAL_VAL_LOSS,
    "eval_general_eval_loss": val_loss("general_eval"),
    "eval_loss": "val_loss",
}


def rename_metrics(logs: dict) -> dict[str, float]:
    return {
        METRIC_NAMES[k]: float(v)
        for k, v in logs.items()
        if k in METRIC_NAMES and isinstance(v, (int, float)) and math.isfinite(v)
    }


class EvaluateAtEnd(TrainerCallback):
    """The last step is always evaluated and saved, so it competes for "best checkpoint" like the others."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True


class EvaluateEarly(TrainerCallback):
    """The first evaluation comes after a few steps, not only at eval_steps: a learning rate that wrecks a
    pretrained model does so within the warm-up, and the guard must see it then."""

    def __init__(self, first_step: int):
        self.first_step = first_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first_step:
            control.should_evaluate = True
            control.should_save = True


class ForgettingStop(TrainerCallback):
    """Ends a stage at the first evaluation whose general loss passes the forgetting budget over the base
    model's; the best checkpoint before the breach is what the stage keeps (see TokenLossTrainer's
    guarded metric), or without one the model the stage started from (tasks/train.py). The loss watched is the
    gate's: the general_eval rows when the run has them (never trained on), else the general split."""

    def __init__(self, base_general: float, budget: float, watched: str = "general"):
        self.base_general, self.budget, self.watched = base_general, budget, watched
        self.stop_reason: str | None = None
        self.breach_general: float | None = None
        self.breach_step: int | None = None

    @property
    def limit(self) -> float:
        return self.base_general * (1 + self.budget)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        general = (metrics or {}).get(f"eval_{self.watched}_loss")
        if general is None or general <= self.limit or self.stop_reason:
            return
        drift, self.breach_general, self.breach_step = general / self.base_general - 1, general, state.global_step
        self.stop_reason = (
            f"general drift {drift:+.1%} at step {state.global_step} passed the forgetting budget of "
            f"{self.budget:.0%} ({self.watched} val loss {general:.4f} vs the base model's {self.base_general:.4f})"
        )
        control.should_training_stop = True


class SamplerPosition(TrainerCallback):
    """Writes the sampler's position into every checkpoint, so a resumed stage provably continues the same
    sample sequence: the manifest it was cut from (by digest) and how many samples were consumed."""

    FILE = "sampler.json"

    def __init__(self, manifest: str, samples_per_step: int):
        self.manifest_digest = file_digest(manifest)
        self.samples_per_step = samples_per_step

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        position = {
            "manifest_sha256": self.manifest_digest,
            "global_step": state.global_step,
            "samples_consumed": state.global_step * self.samples_per_step,
        }
        (folder / self.FILE).write_text(json.dumps(position, indent=2))

    def check_resume(self, checkpoint: str) -> int:
        saved = json.loads((Path(checkpoint) / self.FILE).read_text())
        if saved["manifest_sha256"] != self.manifest_digest:
            raise RuntimeError(f"{checkpoint} was trained on another mix manifest; refusing to resume from it")
        return saved["samples_consumed"]


class OverfitWatch(TrainerCallback):
    """Feeds every evaluation to an OverfitTracker; ends the stage when the general set's overfitting is
    confirmed (the domain set has its own early stopping on the best-checkpoint metric)."""

    def __init__(self, tracker: OverfitTracker, sink: Callable[[dict, int], None] | None = None):
        self.tracker, self.sink = tracker, sink
        self.train_loss = math.nan
        self.stop_reason: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step:  # resumed from a checkpoint
            self.replay_history(state.log_history)

    def replay_history(self, history: list[dict]) -> None:
        """A resumed stage's tracker is fed the evaluations its checkpoint's state recorded, in order, so its
        slopes, gaps and onsets continue exactly as in a stage never interrupted (their metrics were logged
        then; nothing is logged again)."""
        for entry in history:
            self.on_log(None, None, None, logs=entry)
            losses = self.validation_losses(entry)
            if losses and not math.isnan(self.train_loss):
                self.tracker.update(entry["step"], self.train_loss, losses)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])

    def validation_losses(self, metrics: dict) -> dict[str, float]:
        return {name: metrics[f"eval_{name}_loss"] for name in self.tracker.sets if f"eval_{name}_loss" in metrics}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        losses = self.validation_losses(metrics or {})
        if math.isnan(self.train_loss) or not losses:
            return
        confirmed = self.tracker.update(state.global_step, self.train_loss, losses)
        if self.sink:
            self.sink(self.tracker.metrics(), state.global_step)
        if "general" in confirmed:
            onset = self.tracker.sets["general"].onset_step
            self.stop_reason = f"general val loss rising since step {onset} while train loss falls"
            control.should_training_stop = True


class MemoryPeak(TrainerCallback):
    """The stage's own peak memory, logged when it ends: resident set size (`peak_rss_mb`; the process's
    high-water mark is reset when the stage starts, where Linux allows it) and on a GPU the most memory CUDA
    held (`cuda_max_memory_mb`)."""

    def __init__(self, sink: Callable[[dict, int], None], log: Callable[[str], None]):
        self.sink, self.log = sink, log
        self.since_start = False

    def on_train_begin(self, args, state, control, **kwargs):
        try:  # "5" resets VmHWM (Linux >= 4.0); without it the peak includes earlier stages of this process
            Path("/proc/self/clear_refs").write_text("5")
            self.since_start = True
        except OSError:
            self.since_start = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, args, state, control, **kwargs):
        metrics = {"peak_rss_mb": peak_rss_mb()}
        if torch.cuda.is_available():
            metrics["cuda_max_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if state.is_world_process_zero:
            self.sink(metrics, state.global_step)
            scope = "this stage" if self.since_start else "the process so far"
            self.log(f"peak memory of {scope}: " + ", ".join(f"{k} {v:,.0f}" for k, v in metrics.items()))


def peak_rss_mb() -> float:
    """VmHWM, not ru_maxrss: the latter cannot be reset, and keeps the peak of a parent this process forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
