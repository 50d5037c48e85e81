"""Budget-bounded delivery by interpolation (validation.interpolate: auto; WiSE-FT): after the last stage the run
delivers base + alpha * (fine-tuned - base) for the alpha with the most domain gain whose general drift stays
within the forgetting budget. Alpha is chosen on one half of the validation rows and confirmed on the other.

The fine-tuned side is the trained stage with the lowest domain loss, whatever its gate said (the budget check
here replaces the gate's), tried at every alpha of INTERPOLATION_ALPHAS; the stage the gate would deliver is
tried too, at alpha 1, so interpolation never delivers less domain gain than the gate would on the choosing
half. A LoRA stage is merged into its base first: its interpolation scales the adapter's update."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from prefect import task
from transformers import AutoTokenizer

from mixtune.core.config import INTERPOLATION_ALPHAS
from mixtune.core.logs import run_logger
from mixtune.core.paths import plots_dir
from tasks import artifacts
from tasks.checkpoints import CheckpointError, problem_with, seal, write_kind
from tasks.lm import PadCollator, mean_token_loss
from tasks.mlflow_names import Metric, Tag, interpolation_metric
from tasks.models import ALL_SETS, evaluate, is_adapter, load_model
from tasks.plots import interpolation_plot
from tasks.records import AlphaPoint, Interpolation, StageReport, TokenLosses
from tasks.requests import RunRequest
from tasks.tables import validation_halves
from tasks.tracking import Tracker

FOLDER, RECORD = "interpolated", "interpolation.json"
CHOOSE, CONFIRM = 0, 1


def full_weights(model_dir: str, base_dir: str):
    """A stage's model with every weight in place: a LoRA adapter merged into its base."""
    model = load_model(model_dir, base_dir)
    return model.merge_and_unload() if is_adapter(model_dir) else model


def float_params(model) -> dict[str, torch.Tensor]:
    """fp32 copies of the parameters (tied ones once: named_parameters lists a shared tensor once)."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


def set_weights(model, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> None:
    """base + alpha * (tuned - base), in fp32, cast to the model's dtype. torch.lerp computes the side near
    alpha 1 as tuned - (1 - alpha) * (tuned - base), so alpha 0 is the base and alpha 1 the tuned weights
    bit for bit."""
    if base.keys() != tuned.keys():
        raise ValueError(f"the fine-tuned model's weights are not the base's: {sorted(base.keys() ^ tuned.keys())[:5]}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = torch.lerp(base[name].to(tuned[name].device), tuned[name], alpha).to(param.dtype)


def half_losses(model, halves: dict, collator: PadCollator, batch_size: int) -> list[TokenLosses]:
    """The model's losses on the choosing half and on the confirming half."""
    measured = [{}, {}]
    for (tag, half), data in halves.items():
        measured[half][tag] = mean_token_loss(model, data, collator, batch_size)
    return [TokenLosses(**m) for m in measured]


def measure(plan: list[tuple[StageReport, tuple[float, ...]]], base_dir: str, halves: dict, batch_size: int):
    """Every (stage, alpha) of the plan on both halves, the base's weights held once in fp32."""
    collator = PadCollator(AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).pad_token_id)
    base = float_params(load_model(base_dir, base_dir))
    points = []
    for report, alphas in plan:
        model = full_weights(report.model_dir, base_dir)
        if torch.cuda.is_available():
            model = model.to("cuda")
        tuned = float_params(model)
        for alpha in alphas:
            set_weights(model, base, tuned, alpha)
            choose, confirm = half_losses(model, halves, collator, batch_size)
            points.append(AlphaPoint(stage=report.stage, alpha=alpha, choose=choose, confirm=confirm))
    return scored(points)


def scored(points: list[AlphaPoint]) -> list[AlphaPoint]:
    """Gain and drift of each point against alpha 0 (the base) on the same half."""
    base = next(p for p in points if p.alpha == 0)

    def gain_and_drift(losses: TokenLosses, reference: TokenLosses) -> tuple[float, float]:
        tag, general = losses.judged_general()
        return 1 - losses.domain / reference.domain, general / getattr(reference, tag) - 1

    out = []
    for p in points:
        choose_gain, choose_drift = gain_and_drift(p.choose, base.choose)
        confirm_gain, confirm_drift = gain_and_drift(p.confirm, base.confirm)
        out.append(
            p.model_copy(
                update={
                    "choose_gain": choose_gain,
                    "choose_drift": choose_drift,
                    "confirm_gain": confirm_gain,
                    "confirm_drift": confirm_drift,
                }
            )
        )
    return out


def describe(p: AlphaPoint, half: str) -> str:
    gain, drift = (p.choose_gain, p.choose_drift) if half == "choose" else (p.confirm_gain, p.confirm_drift)
    return f"alpha {p.alpha:g} of stage {p.stage}: domain gain {gain:+.2%}, general drift {drift:+.2%}"


def choose(points: list[AlphaPoint], budget: float) -> tuple[AlphaPoint, str]:
    """The point with the most domain gain on the choosing half among those within the budget there (the
    smaller alpha on a tie: closer to the base). If it breaks the budget on the confirming half, the next best
    that holds on both halves; the base (alpha 0, drift 0) always does."""
    fits = sorted((p for p in points if p.choose_drift <= budget), key=lambda p: (-p.choose_gain, p.alpha))
    broke = []
    for p in fits:
        if p.confirm_drift <= budget:
            said = f"{describe(p, 'choose')} on the choosing half; confirmed on the other ({describe(p, 'confirm')})"
            if broke:
                said += "; before it, " + "; ".join(f"{describe(b, 'confirm')} broke the budget there" for b in broke)
            return p, said
        broke.append(p)
    raise ValueError("no interpolation holds the budget, not even the base: the points have no alpha 0")


def interpolation_plan(reports: list[StageReport]) -> list[tuple[StageReport, tuple[float, ...]]]:
    """The grid on the stage with the lowest domain loss; the gate's pick at alpha 1 when it is another."""
    lowest = lowest_domain(reports)
    gated = lowest_domain([r for r in reports if r.gate.decision == "continue"])
    plan = [(lowest, INTERPOLATION_ALPHAS)]
    return plan + [(gated, (1.0,))] if gated and gated.stage != lowest.stage else plan


def lowest_domain(reports: list[StageReport]) -> StageReport | None:
    return min(reversed(reports), key=lambda r: r.losses.domain) if reports else None


def save_interpolated(model, base_dir: str, folder: Path, about: dict) -> None:
    """A checkpoint like a stage's final: safetensors and the tokenizer, sealed with a manifest while in a
    side folder, moved into place whole, then verified."""
    staging = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).save_pretrained(staging)
    write_kind(staging, "model", interpolation=about)
    seal(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    reason = problem_with(folder)
    if reason:
        raise CheckpointError(f"the interpolated model does not verify: {reason}")


def deliver(
    chosen: AlphaPoint,
    reports: list[StageReport],
    baseline: TokenLosses,
    base_dir: str,
    sft_path: str,
    folder: Path,
    batch_size: int,
) -> tuple[str, TokenLosses]:
    """The chosen weights' folder and losses on the whole validation sets: the base's or the stage's own at
    alpha 0 and 1, else a new model made and measured as a stage's is."""
    if chosen.alpha == 0:
        return base_dir, baseline
    report = next(r for r in reports if r.stage == chosen.stage)
    if chosen.alpha == 1:
        return report.model_dir, report.losses
    model = full_weights(report.model_dir, base_dir)
    set_weights(model, float_params(load_model(base_dir, base_dir)), float_params(model), chosen.alpha)
    save_interpolated(model, base_dir, folder, {"stage": chosen.stage, "alpha": chosen.alpha})
    return str(folder), evaluate(str(folder), base_dir, sft_path, batch_size, label="interpolated: validation loss")


def interpolate(request: RunRequest, reports: list[StageReport]) -> Interpolation | None:
    """The delivered interpolation; None when off or no stage trained. A finished one is reused on resume."""
    config, base_dir, sft_path = request.config, request.base_dir, request.sft_path
    run_folder = request.tracker.run_folder
    if config.validation.interpolate == "off" or not reports:
        return None
    record = Path(run_folder) / RECORD
    if record.is_file():
        done = Interpolation.model_validate_json(record.read_text())
        if done.model_dir != str(Path(run_folder) / FOLDER) or not problem_with(done.model_dir):
            run_logger().info("interpolation: finished before, reused (%s)", done.reason)
            return done
    halves, batch = validation_halves(sft_path, ALL_SETS), config.validation.batch_size
    empty = [f"{tag} half {half}" for (tag, half), rows in halves.items() if not len(rows)]
    if empty:
        run_logger().warning("interpolation skipped: a validation set has under 2 rows (%s)", ", ".join(empty))
        return None
    points = measure(interpolation_plan(reports), base_dir, halves, batch)
    chosen, reason = choose(points, config.validation.forgetting_budget)
    model_dir, losses = deliver(chosen, reports, request.baseline, base_dir, sft_path, Path(run_folder) / FOLDER, batch)
    stage = chosen.stage if chosen.alpha else 0
    result = Interpolation(
        stage=stage, alpha=chosen.alpha, model_dir=model_dir, losses=losses, points=points, reason=reason
    )
    staging = record.with_name(f"{RECORD}.tmp")
    staging.write_text(result.model_dump_json(indent=2))
    os.replace(staging, record)
    return result


def record_interpolation(result: Interpolation, budget: float, tracker: Tracker, folder: Path) -> Path:
    """Each point's losses and drifts at step = its place in the list; the chosen alpha; the plot."""
    for step, p in enumerate(result.points):
        numbers = {Metric.INTERPOLATION_ALPHA_TRIED: p.alpha, Metric.INTERPOLATION_STAGE: p.stage}
        for half in ("choose", "confirm"):
            losses: TokenLosses = getattr(p, half)
            numbers[interpolation_metric(half, "domain_loss")] = losses.domain
            numbers[interpolation_metric(half, "general_loss")] = losses.judged_general()[1]
            numbers[interpolation_metric(half, "domain_gain")] = getattr(p, f"{half}_gain")
            numbers[interpolation_metric(half, "general_drift")] = getattr(p, f"{half}_drift")
        tracker.log_metrics(numbers, step=step)
    tracker.log_metrics({Metric.INTERPOLATION_ALPHA: result.alpha}, step=result.stage)
    tracker.set_tags({Tag.INTERPOLATION_ALPHA: f"{result.alpha:g}", Tag.INTERPOLATION_REASON: result.reason})
    plot = interpolation_plot(result.points, budget, result.alpha, folder / "interpolation.png")
    tracker.log_artifacts(plot, "plots")
    return plot


@task(name="interpolate", task_run_name="interpolate", retries=2, retry_delay_seconds=[2, 10])
def interpolate_task(request: RunRequest, reports: list[StageReport]) -> Interpolation | None:
    result = interpolate(request, reports)
    if result is None:
        return None
    budget, tracker = request.config.validation.forgetting_budget, request.tracker
    plot = record_interpolation(result, budget, tracker, plots_dir(tracker.run_folder))
    artifacts.image("interpolation", plot, "Domain gain and general drift per interpolation weight")
    run_logger().info("interpolation: delivers %s (%s)", result.model_dir, result.reason)
    return result
