"""MiniMind's fine-tuning rules as a plan that explains itself: method, epochs and schedule from the data's size,
and per-source epoch accounting that keeps a small domain set from being repeated into overfitting.

Pure functions: every number in a plan comes with the rule that produced it.
"""

from __future__ import annotations

import json
import math

from prefect import task
from pydantic import BaseModel

from mixtune.core.config import INTERPOLATION_ALPHAS, Advisor, PipelineConfig
from mixtune.core.logs import run_logger
from tasks import artifacts
from tasks.records import SourceStats
from tasks.schedule import stage_shares
from tasks.tracking import Tracker


class Advice(BaseModel):
    method: str
    domain_epochs: float  # passes over the domain data across the whole run
    shares: list[float]
    samples_per_stage: int
    pretrain_first: bool
    reasons: list[str]


class StageBudget(BaseModel):
    stage: int
    share: float
    samples: int
    domain_samples: int
    domain_epochs: float  # how many times the domain pool is seen in this stage
    cumulative_domain_epochs: float
    general_epochs: float
    cumulative_general_epochs: float


class EpochPlan(BaseModel):
    samples_per_stage: int
    domain_pool: int
    general_pool: int
    domain_epoch_budget: float
    general_epoch_budget: float
    stages: list[StageBudget]
    warnings: list[str]


def rule_epochs(samples: int, rules: Advisor) -> tuple[float, str]:
    """About a million samples -> 1 epoch; thousands to tens of thousands -> 1-3 epochs."""
    if samples >= rules.one_epoch_from:
        return 1.0, f"{samples:,} samples >= {rules.one_epoch_from:,}: 1 epoch is enough at this volume"
    if samples < rules.three_epochs_below:
        return 3.0, (
            f"{samples:,} samples < {rules.three_epochs_below:,}: up to 3 epochs "
            "(thousands of samples; never more, or the model overfits)"
        )
    return 2.0, (
        f"{rules.three_epochs_below:,} <= {samples:,} samples < {rules.one_epoch_from:,}: "
        "2 epochs (tens to hundreds of thousands of samples)"
    )


def advise(domain: int, general: int, pretrain_docs: int, config: PipelineConfig) -> Advice:
    rules, reasons = config.advisor, []
    if domain < rules.lora_below:
        method = "lora"
        reasons.append(
            f"method lora: {domain:,} domain samples < {rules.lora_below:,} is scarce data; "
            "low-rank adapters keep the base model's abilities"
        )
    else:
        method = "full"
        reasons.append(
            f"method full: {domain:,} domain samples >= {rules.lora_below:,} support full SFT, "
            "mixed into general data stage by stage so general ability is kept"
        )
    epochs, why = rule_epochs(domain, rules)
    if method == "full":
        shares = stage_shares(rules.schedule)
        reasons.append(
            f"schedule {', '.join(f'{s:.2f}' for s in shares)}: full SFT mixes domain into general "
            f"data, from about {rules.schedule.start:.0%} rising to about {rules.schedule.end:.0%} "
            f"over {len(shares)} stages ({rules.schedule.shape}), so general ability is kept"
        )
    else:
        shares = [rules.schedule.end]
        reasons.append(
            f"schedule {shares[0]:.2f}: one stage; LoRA leaves the base weights untouched, and the "
            "general half of the mix still guards what the adapter changes"
        )
    samples = samples_for_epochs(shares, domain, epochs, config)
    reasons.append(
        f"domain epochs {epochs:g} in total: {why}; so {samples:,} samples per stage "
        f"(the stages' domain shares add up to {epochs:g} passes over {domain:,} samples)"
    )
    samples = cap_for_general(shares, samples, domain, general, config, reasons)
    pretrain_first = config.goal == "knowledge"
    if pretrain_first:
        note = (
            f"{pretrain_docs:,} pre-training documents"
            if pretrain_docs
            else "no source has role pretrain yet: add the domain's plain text"
        )
        reasons.append(f"continued pre-training first: the goal is new knowledge, which SFT does not add ({note})")
    else:
        reasons.append("no continued pre-training: the goal is behaviour (format, style, task), which is SFT's job")
    if general == 0:
        reasons.append("warning: no general samples, so nothing protects general ability")
    chosen = config.model_copy(update={"train": config.train.model_copy(update={"method": method})})
    rate, why = chosen.train_learning_rate()
    reasons.append(f"learning rate {rate:g} for {method}: {why}")
    return Advice(
        method=method,
        domain_epochs=epochs,
        shares=shares,
        samples_per_stage=samples,
        pretrain_first=pretrain_first,
        reasons=reasons,
    )


def samples_for_epochs(shares: list[float], domain_pool: int, epochs: float, config: PipelineConfig) -> int:
    floor = config.train.batch_size * config.advisor.min_steps_per_stage
    return max(floor, math.floor(epochs * domain_pool / sum(shares))) if sum(shares) else floor


def cap_for_general(
    shares: list[float], samples: int, domain: int, general: int, config: PipelineConfig, reasons: list[str]
) -> int:
    """The general pool earns an epoch budget by its size too; a small general set shrinks the stages."""
    budget, why = rule_epochs(general, config.advisor)
    weight = len(shares) - sum(shares)
    seen = samples * weight / general if general else 0.0
    if not general or seen <= budget:
        return samples
    fitted = max(math.floor(budget * general / weight), config.train.batch_size * config.advisor.min_steps_per_stage)
    domain_seen = fitted * sum(shares) / max(domain, 1)
    reasons.append(
        f"warning: general epochs capped at {budget:g} ({why.split(':')[0]}): {samples:,} samples per stage would "
        f"show the {general:,} general samples {seen:.1f}x, so stages shrink to {fitted:,} samples and the domain "
        f"set is seen {domain_seen:.2f}x in total; add general data to use more of the domain set"
    )
    return fitted


def apply_advice(config: PipelineConfig, advice: Advice) -> PipelineConfig:
    """The config the flow runs with `plan: auto`: the advice replaces method, epochs and schedule."""
    planned = config.model_copy(deep=True)
    planned.train.method = advice.method
    planned.train.epochs = 1.0  # the stage sizes carry the domain epochs; each stage's mix is seen once
    if advice.method == "full" and config.advisor.schedule.shape == "adaptive":  # the ramp chooses its shares
        planned.schedule = config.advisor.schedule.model_copy()
    else:  # the advice's shares replace a config's own adaptive shape, which refuses a list of shares
        shape = "linear" if planned.schedule.shape == "adaptive" else planned.schedule.shape
        planned.schedule = planned.schedule.model_copy(update={"shape": shape, "shares": advice.shares})
    planned.schedule.samples_per_stage = advice.samples_per_stage
    if advice.pretrain_first:
        planned.pretrain.enabled = True
    return planned


def epoch_plan(
    shares: list[float],
    samples_per_stage: int,
    epochs: float,
    domain_pool: int,
    general_pool: int,
    config: PipelineConfig,
) -> EpochPlan:
    """Per stage and in total, how often each pool is seen. The epoch rule holds for every pool by its size:
    stages are shrunk until neither the domain nor the general pool is repeated past the budget it earns,
    with a warning in numbers for each cut, and another when even the smallest stage cannot hold."""
    pools = {"domain": domain_pool, "general": general_pool}
    budgets = {role: rule_epochs(pool, config.advisor)[0] for role, pool in pools.items()}
    floor = config.train.batch_size * config.advisor.min_steps_per_stage
    warnings, samples = [], samples_per_stage
    for role, pool in pools.items():
        seen = times_seen(role, shares, samples, epochs, pool)
        weight = sum(shares) if role == "domain" else len(shares) - sum(shares)
        if pool and weight and seen > budgets[role] + 1e-9:
            fitted = max(math.floor(budgets[role] * pool / (epochs * weight)), floor)
            warnings.append(
                f"{role} pool of {pool:,} would be seen {seen:.2f}x, over its budget of {budgets[role]:g}x: "
                f"samples_per_stage lowered from {samples:,} to {fitted:,}"
            )
            samples = min(samples, fitted)
    for role, pool in pools.items():
        seen = times_seen(role, shares, samples, epochs, pool)
        if pool and seen > budgets[role] + 1e-9:
            warnings.append(
                f"cannot meet the budget: even {floor:,} samples per stage (the minimum of "
                f"{config.advisor.min_steps_per_stage} steps) shows the {role} pool {seen:.2f}x > "
                f"{budgets[role]:g}x; add {role} data, "
                f"{'lower' if role == 'domain' else 'raise'} the shares or use fewer stages"
            )
    return EpochPlan(
        samples_per_stage=samples,
        domain_pool=domain_pool,
        general_pool=general_pool,
        domain_epoch_budget=budgets["domain"],
        general_epoch_budget=budgets["general"],
        stages=stage_budgets(shares, samples, epochs, domain_pool, general_pool),
        warnings=warnings,
    )


def times_seen(role: str, shares: list[float], samples: int, epochs: float, pool: int) -> float:
    """How many passes over a pool the whole schedule makes (the mix draws each stage's rows from it)."""
    domain = sum(round(s * samples) for s in shares)
    drawn = domain if role == "domain" else samples * len(shares) - domain
    return drawn * epochs / max(pool, 1)


def stage_budgets(
    shares: list[float], samples: int, epochs: float, domain_pool: int, general_pool: int
) -> list[StageBudget]:
    stages, cumulative, cumulative_general = [], 0.0, 0.0
    for k, share in enumerate(shares, start=1):
        n_domain = round(share * samples)
        seen = n_domain * epochs / max(domain_pool, 1)
        general_seen = (samples - n_domain) * epochs / max(general_pool, 1)
        cumulative += seen
        cumulative_general += general_seen
        stages.append(
            StageBudget(
                stage=k,
                share=share,
                samples=samples,
                domain_samples=n_domain,
                domain_epochs=seen,
                cumulative_domain_epochs=cumulative,
                general_epochs=general_seen,
                cumulative_general_epochs=cumulative_general,
            )
        )
    return stages


def format_plan(advice: Advice | None, plan: EpochPlan, config: PipelineConfig) -> str:
    lines = []
    if advice is not None:
        lines += ["Advice (MiniMind's fine-tuning rules):", *[f"  - {r}" for r in advice.reasons], ""]
    lines += [
        f"Plan ({'auto: the advice is used' if config.plan == 'auto' else 'manual: the config as given'}):",
        f"  method {config.train.method}, {config.train.epochs:g} epoch(s) per stage, "
        f"{plan.samples_per_stage:,} samples per stage",
        "  learning rate {:g}: {}".format(*config.train_learning_rate()),
        f"  domain pool {plan.domain_pool:,} (budget {plan.domain_epoch_budget:g} epochs), "
        f"general pool {plan.general_pool:,} (budget {plan.general_epoch_budget:g} epochs)",
        "  stage  share  domain samples  domain epochs  cumulative  general epochs  cumulative",
    ]
    for s in plan.stages:
        lines.append(
            f"  {s.stage:>5}  {s.share:5.2f}  {s.domain_samples:>14,}  {s.domain_epochs:13.2f}  "
            f"{s.cumulative_domain_epochs:10.2f}  {s.general_epochs:14.2f}  {s.cumulative_general_epochs:10.2f}"
        )
    lines += [f"  warning: {w}" for w in plan.warnings]
    if config.validation.interpolate == "auto":
        lines.append(
            "  delivery: base + alpha * (fine-tuned - base) for the alpha of "
            f"{' '.join(f'{a:g}' for a in INTERPOLATION_ALPHAS)} with the most domain gain within the "
            f"{config.validation.forgetting_budget:.0%} forgetting budget (chosen on half the validation rows, "
            "confirmed on the other half)"
        )
    return "\n".join(lines)


def advice_differs(advice: Advice, config: PipelineConfig) -> str | None:
    """One short line when the advisor would run something else than the plan being run, else None: the
    full advice is `mixtune advise`'s to print, and read in the log it looks like the plan itself."""
    differences = []
    if advice.method != config.train.method:
        differences.append(f"method {advice.method}")
    if [round(s, 2) for s in advice.shares] != [round(s, 2) for s in stage_shares(config.schedule)]:
        differences.append(f"schedule {' '.join(f'{s:.2f}' for s in advice.shares)}")
    if not differences:
        return None
    return f"advice differs: {', '.join(differences)} (see mixtune advise)"


class RunPlan(BaseModel):
    config: PipelineConfig  # what the rest of the flow runs with
    advice: Advice
    epochs: EpochPlan
    text: str


def pool_sizes(stats: dict[str, SourceStats]) -> dict[str, int]:
    sizes = {"general": 0, "domain": 0, "pretrain": 0}
    for source in stats.values():
        if source.role in sizes:  # general_eval rows are never trained on
            sizes[source.role] += source.train
    return sizes


def make_plan(config: PipelineConfig, stats: dict[str, SourceStats]) -> RunPlan:
    pools = pool_sizes(stats)
    advice = advise(pools["domain"], pools["general"], pools["pretrain"], config)
    planned = apply_advice(config, advice) if config.plan == "auto" else config.model_copy(deep=True)
    epochs = epoch_plan(
        stage_shares(planned.schedule),
        planned.schedule.samples_per_stage,
        planned.train.epochs,
        pools["domain"],
        pools["general"],
        planned,
    )
    planned.schedule.samples_per_stage = epochs.samples_per_stage
    return RunPlan(config=planned, advice=advice, epochs=epochs, text=format_plan(advice, epochs, planned))


@task(name="plan", task_run_name="plan", retries=2, retry_delay_seconds=[2, 10])
def plan_task(config: PipelineConfig, stats: dict[str, SourceStats], tracker: Tracker) -> RunPlan:
    plan = make_plan(config, stats)
    tracker.log_text(plan.text, "plan/plan.txt")
    public = {**plan.model_dump(mode="json"), "config": plan.config.public_dump()}
    tracker.log_text(json.dumps(public, indent=2), "plan/plan.json")
    tracker.log_params(
        {
            "plan.mode": config.plan,
            "plan.method": plan.config.train.method,
            "plan.epochs": str(plan.config.train.epochs),
            "plan.learning_rate": str(plan.config.train_learning_rate()[0]),
            "plan.samples_per_stage": str(plan.epochs.samples_per_stage),
            "plan.shares": ",".join(f"{s:.4f}" for s in stage_shares(plan.config.schedule)),
        }
    )
    artifacts.markdown("plan", f"```\n{plan.text}\n```", "The plan and the rules behind it")
    for line in format_plan(None, plan.epochs, plan.config).splitlines():
        run_logger().info(line)
    note = advice_differs(plan.advice, plan.config)
    if note:
        run_logger().info(note)
    return plan
