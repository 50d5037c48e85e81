"""One stage of SFT (full or LoRA) on its mix, with transformers' Trainer and peft.

Each stage starts from the previous stage's weights (for LoRA: the base model plus the previous adapter).
Checkpoints are safetensors in HF layout inside the stage's folder; a retried stage resumes from its own
last checkpoint, and a stage that already finished is not trained again.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from prefect import task
from torch.distributed.elastic.multiprocessing.errors import record as report_worker_errors
from torch.utils.data import Subset
from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, set_seed

from mixtune.core.cache import COMPLETE_MARKER, mark_complete
from mixtune.core.config import PipelineConfig
from mixtune.core.disk import DiskFull
from mixtune.core.logs import run_logger
from mixtune.core.retry import retry_unless
from tasks.callbacks import (
    EvaluateAtEnd,
    EvaluateEarly,
    ForgettingStop,
    LiveProgress,
    MemoryPeak,
    OverfitWatch,
    ProgressCallback,
    SamplerPosition,
)
from tasks.checkpoints import (
    Seal,
    checkpoint_bytes,
    last_good_checkpoint,
    make_room,
    problem_with,
    seal,
    set_aside,
    space_for_checkpoints,
    write_kind,
)
from tasks.guard import OverfitTracker, kept_model
from tasks.lm import (
    PackCollator,
    PadCollator,
    TokenLossTrainer,
    length_grouped_order,
    training_arguments,
    world_rank,
    world_size,
)
from tasks.models import ALL_SETS, is_adapter, weights_digest
from tasks.records import StageMix, StageTraining, TokenLosses
from tasks.requests import StageRequest
from tasks.retention import KeepCheckpoints
from tasks.schedule import stage_shares
from tasks.stage_time import StageTime
from tasks.tables import TokenDataset, stage_table, validation_sets
from tasks.tracking import Tracker, metric_name


def load_for_training(config: PipelineConfig, init_dir: str, base_dir: str):
    if config.train.method == "full":
        return AutoModelForCausalLM.from_pretrained(init_dir, trust_remote_code=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False)
    if is_adapter(init_dir):
        return PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    lora = config.train.lora
    set_seed(config.run.seed)  # the adapter's initial weights are random: the same config, the same adapter
    return get_peft_model(
        base,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def stage_learning_rate(config: PipelineConfig, stage: int) -> float:
    return config.train_learning_rate()[0] * config.train.stage_lr_decay ** (stage - 1)


def stage_params(config: PipelineConfig, mix: StageMix, init_dir: str) -> dict:
    t = config.train
    params = {
        "method": t.method,
        "stage": mix.stage,
        "target_domain_share": mix.target_share,
        "realised_domain_share": round(mix.realised_share, 6),
        "samples": mix.samples,
        "learning_rate": stage_learning_rate(config, mix.stage),
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "batching": t.batching,
        "devices": t.devices,
        "lr_scheduler": t.lr_scheduler,
        "rewarm": t.rewarm,
        "eval_steps": config.validation.eval_steps,
        "patience": config.validation.patience,
        "init_from": init_dir,
    }
    if t.method == "lora":
        params.update(
            {
                "lora_r": t.lora.r,
                "lora_alpha": t.lora.alpha,
                "lora_dropout": t.lora.dropout,
                "lora_target_modules": ",".join(t.lora.target_modules),
            }
        )
    return params


def overfit_tracker(config: PipelineConfig) -> OverfitTracker:
    v = config.validation
    return OverfitTracker(
        {"domain": v.patience, "general": v.general_patience}, {"domain": v.min_delta, "general": v.general_min_delta}
    )


def train_collator(config: PipelineConfig, pad_id: int) -> PackCollator | PadCollator:
    t = config.train
    return (
        PackCollator(pad_id, t.packed_row_len or config.model.max_seq_len)
        if t.batching == "packed"
        else PadCollator(pad_id)
    )


def train_order(config: PipelineConfig, dataset: TokenDataset) -> TokenDataset | Subset:
    """The stage's samples in the order the sampler reads them: grouped by length where train.batching asks."""
    if config.train.batching != "grouped":
        return dataset
    lengths = [len(ids) for ids in dataset.input_ids]
    return Subset(dataset, length_grouped_order(lengths, config.train.batch_size, config.run.seed))


def build_trainer(
    config: PipelineConfig,
    stage: int,
    model,
    tokenizer,
    train_set,
    eval_sets,
    checkpoints: Path,
    callbacks: list,
    forgetting: ForgettingStop | None = None,
    clock: StageTime | None = None,
):
    """The mix manifest already holds every pass over the mix, so the Trainer runs one epoch over it."""
    t, v = config.train, config.validation
    args = training_arguments(
        str(checkpoints),
        learning_rate=stage_learning_rate(config, stage),
        batch_size=t.batch_size // world_size(),  # the global batch is the same on any number of processes
        eval_batch_size=v.batch_size,
        seed=config.run.seed,
        precision=t.precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_ratio if t.rewarm or stage == 1 else 0,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=v.eval_steps,
        save_strategy="steps",
        save_steps=v.eval_steps,
        save_total_limit=None,  # KeepCheckpoints rotates, after the new checkpoint is sealed
        load_best_model_at_end=True,
        metric_for_best_model="eval_guarded_domain_loss" if forgetting else "eval_domain_loss",
        greater_is_better=False,
    )
    early = [EvaluateEarly(v.first_eval_step)] if v.first_eval_step < v.eval_steps else []
    stopper = EarlyStoppingCallback(early_stopping_patience=v.patience, early_stopping_threshold=v.min_delta)
    return TokenLossTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets,
        data_collator=train_collator(config, tokenizer.pad_token_id),
        callbacks=[
            *callbacks,
            *([forgetting] if forgetting else []),
            *early,
            EvaluateAtEnd(),
            stopper,
            Seal(),
            KeepCheckpoints(t.keep_checkpoints),
        ],
        general_limit=forgetting.limit if forgetting else None,
        guarded_set=forgetting.watched if forgetting else "general",
        clock=clock,
    )


def train_stage(request: StageRequest) -> StageTraining | None:
    """Train one stage into its `stage_dir`, logging to the stage's run. Given the base model's losses, the stage
    also stops at the first evaluation past the forgetting budget."""
    config, mix, init_dir, base_dir = request.config, request.mix, request.init_dir, request.base_dir
    stage_dir = Path(request.stage_dir)
    final, record = stage_dir / "final", stage_dir / "training.json"
    if finished(final, record, stage_dir / "set-aside"):
        run_logger().info("stage %d: finished before, reused from %s", mix.stage, final)
        return StageTraining.model_validate_json(record.read_text())
    first, clock = world_rank() == 0, StageTime()
    tracker = request.tracker if first else request.tracker.silent()
    log_metrics = clock.timed("MLflow", tracker.log_metrics)
    with clock.phase("trainer set-up"):
        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
        progress = ProgressCallback(f"stage {mix.stage}", run_logger().info, log_metrics)
        live = [LiveProgress(f"stage {mix.stage}/{len(stage_shares(config.schedule))}")] if first else []
        position = SamplerPosition(mix.manifest, config.train.batch_size * config.train.gradient_accumulation_steps)
        watch = OverfitWatch(overfit_tracker(config), log_metrics)
        forgetting = forgetting_stop(config, request.baseline)
    with clock.phase("model load"):
        model = load_for_training(config, init_dir, base_dir)
    with clock.phase("trainer set-up"):
        trainer = build_trainer(
            config,
            mix.stage,
            model,
            tokenizer,
            train_order(config, TokenDataset(stage_table(request.sft_path, mix.manifest))),
            validation_sets(request.sft_path, ALL_SETS),
            stage_dir / "checkpoints",
            [progress, *live, position, watch, MemoryPeak(log_metrics, run_logger().info)],
            forgetting,
            clock,
        )
        resume = last_good_checkpoint(stage_dir / "checkpoints", stage_dir / "set-aside", run_logger().warning)
        needed = checkpoint_bytes(trainer.model)
        make_room(stage_dir / "checkpoints", stage_dir / "set-aside", needed, run_logger().warning)
    if resume:
        consumed = position.check_resume(resume)
        run_logger().info(
            "stage %d resumes from %s (step %d, %d samples of the mix already seen); later steps are redone",
            mix.stage,
            resume,
            checkpoint_step(resume),
            consumed,
        )
    with clock.phase("MLflow"):  # after the resume check: it names a changed mix
        tracker.log_params(stage_params(config, mix, init_dir))
        tracker.log_metrics(mix_metrics(mix), step=0)
    with stage_space(stage_dir, "checkpoints", needed):
        trainer.train(resume_from_checkpoint=resume)
    if not first:
        return None  # the first process saves the final model and the stage record
    state = trainer.state
    result = StageTraining(
        stage=mix.stage,
        run_id=tracker.run_id,
        stage_dir=str(stage_dir),
        model_dir=str(final),
        global_step=state.global_step,
        max_steps=state.max_steps,
        best_step=checkpoint_step(state.best_model_checkpoint),
        stopped_early=state.global_step < state.max_steps,
        tokens_per_second=progress.tokens_per_second,
        learning_rate=stage_learning_rate(config, mix.stage),
        overfit_onset=watch.tracker.onsets(),
        stop_reason=early_stop_reason(state, watch, forgetting, config),
    )
    with clock.phase("MLflow"):
        record_onsets(tracker, result)
    with clock.phase("final model"), stage_space(stage_dir, "final", needed):
        save_final(kept_weights(trainer, forgetting, config, init_dir, base_dir), tokenizer, final)
        result.best_losses, result.weights_digest = best_evaluation(state), weights_digest(str(final))
        result.breach_general = forgetting.breach_general if forgetting else None
        record.write_text(result.model_dump_json(indent=2))
        mark_complete(final)
    run_logger().info("%s", clock.line(f"stage {mix.stage}", progress.train_seconds))
    return result


def stage_space(stage_dir: Path, folder: str, needed: int):
    what = "a checkpoint" if folder == "checkpoints" else "the stage's final model"
    checkpoints, aside = stage_dir / "checkpoints", stage_dir / "set-aside"
    return space_for_checkpoints(stage_dir / folder, what, needed, checkpoints, aside, run_logger().warning)


def kept_weights(trainer, forgetting: ForgettingStop | None, config: PipelineConfig, init_dir: str, base_dir: str):
    """The model the stage keeps: Trainer has restored its best checkpoint, if any. A breach at the first
    evaluation leaves none, and Trainer's weights are then the ones that forgot: the stage keeps the model it
    started from instead (for a new LoRA adapter: one that changes nothing yet)."""
    if forgetting and forgetting.stop_reason and trainer.state.best_model_checkpoint is None:
        return load_for_training(config, init_dir, base_dir)
    return trainer.model


def forgetting_stop(config: PipelineConfig, baseline: TokenLosses | None) -> ForgettingStop | None:
    v = config.validation
    if baseline is None or not v.stop_mid_stage:
        return None
    watched, base_loss = baseline.judged_general()
    return ForgettingStop(base_loss, v.forgetting_budget, watched)


def early_stop_reason(
    state, watch: OverfitWatch, forgetting: ForgettingStop | None, config: PipelineConfig
) -> str | None:
    best = checkpoint_step(state.best_model_checkpoint)
    if forgetting and forgetting.stop_reason:  # may come at the last step too: the stage did not end well
        return f"{forgetting.stop_reason}; {kept_model(best, forgetting.breach_step)}"
    if state.global_step >= state.max_steps:
        return None
    cause = watch.stop_reason or f"domain val loss did not improve for {config.validation.patience} evaluations"
    return f"{cause}; {kept_model(best)}"


def mix_metrics(mix: StageMix) -> dict[str, float]:
    per_source = {f"epochs/{metric_name(source)}": value for source, value in mix.source_epochs.items()}
    return {
        "realised_domain_share": mix.realised_share,
        "realised_domain_token_share": mix.realised_token_share,
        "domain_epochs": mix.domain_epochs,
        "general_epochs": mix.general_epochs,
        **per_source,
    }


def record_onsets(tracker: Tracker, result: StageTraining) -> None:
    onsets = {f"overfit_onset_step_{name}": step for name, step in result.overfit_onset.items() if step is not None}
    if onsets:
        tracker.log_metrics(onsets, step=result.global_step)
        run_logger().info("stage %d: overfitting began at %s; %s", result.stage, onsets, kept_model(result.best_step))


def best_evaluation(state) -> TokenLosses | None:
    """The losses logged when the restored checkpoint was evaluated (the same sets validation uses)."""
    step = checkpoint_step(state.best_model_checkpoint)
    for entry in state.log_history:
        if entry.get("step") == step and "eval_domain_loss" in entry and "eval_general_loss" in entry:
            return TokenLosses(
                domain=entry["eval_domain_loss"],
                general=entry["eval_general_loss"],
                general_eval=entry.get("eval_general_eval_loss"),
            )
    return None


def checkpoint_step(path: str | None) -> int | None:
    return int(Path(path).name.rsplit("-", 1)[-1]) if path else None


def save_final(model, tokenizer, folder: Path) -> None:
    """The best checkpoint (loaded at the end of training) as a full model or an adapter, in HF layout."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_kind(folder, "adapter" if is_adapter(str(folder)) else "model")
    seal(folder)


def finished(final: Path, record: Path, aside: Path) -> bool:
    """The stage's model and record are complete and `final/` still matches its manifest. A damaged one is set
    aside, and the stage is finished again from its last good checkpoint."""
    if not (final / COMPLETE_MARKER).is_file():  # its seal's manifest, not the marker, says what is damaged
        return False
    reason = problem_with(final) or (None if record.is_file() else f"{record}: missing")
    if reason is None:
        return True
    set_aside(final, aside, reason, run_logger().warning)
    return False


def train_on_devices(request: StageRequest) -> StageTraining:
    """The stage on train.devices processes through torchrun (gloo on CPU, nccl on GPUs): each runs train_stage
    on its share of every global batch; the first alone logs to MLflow, seals checkpoints and writes the record."""
    stage_dir, stage = Path(request.stage_dir), request.mix.stage
    final, record = stage_dir / "final", stage_dir / "training.json"
    if finished(final, record, stage_dir / "set-aside"):
        run_logger().info("stage %d: finished before, reused from %s", stage, final)
        return StageTraining.model_validate_json(record.read_text())
    # Damaged checkpoints are set aside here, once, before several processes look for the last good one.
    last_good_checkpoint(stage_dir / "checkpoints", stage_dir / "set-aside", run_logger().warning)
    stage_dir.mkdir(parents=True, exist_ok=True)
    request_file = stage_dir / "devices-request.json"
    request_file.write_text(request.model_dump_json())
    devices = request.config.train.devices
    run_logger().info(
        "stage %d: training on %d process(es) per node (torchrun %s)", stage, devices, " ".join(rendezvous())
    )
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous(), f"--nproc-per-node={devices}"]
    run_workers([*command, "-m", "tasks.train", str(request_file)], f"stage {stage} on {devices} processes")
    if not (final / COMPLETE_MARKER).is_file():
        raise RuntimeError(f"stage {stage}: the training processes ended without saving {final}")
    return StageTraining.model_validate_json(record.read_text())


def on_several_processes(config: PipelineConfig) -> bool:
    """More than one device here, or nodes joined through MIXTUNE_TORCHRUN_ARGS (even one process per node)."""
    return config.train.devices > 1 or bool(os.environ.get("MIXTUNE_TORCHRUN_ARGS", "").strip())


def rendezvous() -> list[str]:
    """One machine by default (a free port on localhost); MIXTUNE_TORCHRUN_ARGS joins several machines, e.g.
    "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=host0:29400 --rdzv-id=stage" (docs/scale-out.md)."""
    extra = os.environ.get("MIXTUNE_TORCHRUN_ARGS", "").strip()
    return shlex.split(extra) if extra else ["--standalone"]


def run_workers(command: list[str], what: str) -> None:
    """Runs torchrun, passing its lines to the run log; a failing process fails the task with its last lines."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as workers:
        for line in workers.stdout:
            tail.append(line.rstrip())
            run_logger().info("%s", line.rstrip())
    if workers.returncode != 0:
        lines = "\n".join(tail)
        raise RuntimeError(f"{what}: a training process failed (torchrun exit {workers.returncode}):\n{lines}")


@report_worker_errors
def worker_main(request_file: str) -> None:
    """One of the processes torchrun starts: `python -m torch.distributed.run ... -m tasks.train REQUEST`."""
    logging.basicConfig(level=logging.INFO if world_rank() == 0 else logging.WARNING, format="%(message)s")
    request = StageRequest.model_validate_json(Path(request_file).read_text())
    if request.config.train.batch_size % world_size():  # nodes joined by hand: the schema saw one node only
        raise ValueError(
            f"train.batch_size {request.config.train.batch_size} does not split over {world_size()} processes "
            "on all nodes: give a multiple of the world size"
        )
    train_stage(request)


@task(
    name="train",
    task_run_name="train stage {request.mix.stage} (share {request.mix.target_share:.2f})",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless(DiskFull),  # space seldom frees itself in 30 s; the message says what to do
)
def train_task(request: StageRequest) -> StageTraining:
    result = train_on_devices(request) if on_several_processes(request.config) else train_stage(request)
    run_logger().info(
        "stage %d trained: %d/%d steps, %s, %.0f tokens/s%s",
        result.stage,
        result.global_step,
        result.max_steps,
        "no best checkpoint" if result.best_step is None else f"best at step {result.best_step}",
        result.tokens_per_second,
        f" (stopped early: {result.stop_reason})" if result.stop_reason else "",
    )
    return result


if __name__ == "__main__":
    worker_main(sys.argv[1])
