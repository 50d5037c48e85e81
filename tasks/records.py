"""The records stages hand each other (through the flow): plain pydantic data, no behaviour.

Kept apart from the stages that make them, so a stage that reads a record never imports the stage that
wrote it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from mixtune.core.config import Role
from tasks.guard import GateDecision

FILES_ONLY = ("shards", "sha256")
ANSWERS_ONLY = ("unfinished", "prompts", "max_new_tokens")


class Exploded(BaseModel):
    """A source whose list field was exploded: `rows` rows of the file became `samples` samples."""

    field: str
    rows: int
    samples: int


class SourceStats(BaseModel):
    """What became of one source's rows: a file (or folder) ingest read, or the base model's answers that
    `data.rehearsal: self` adds. accepted + duplicates + quarantined = rows_read; accepted = train + val."""

    file: str
    role: Role
    layout: str  # how it was read, e.g. "jsonl, gzip, 3 shards"
    shards: list[str] | None = None  # a folder's shard names; None: one file
    sha256: str | None = None  # of the file, or of a folder's shards; what the ingest cache keys on
    utf8_bom: bool
    formats: dict[str, int]  # rows per format detected
    exploded: Exploded | None
    rows_read: int
    accepted: int
    duplicates: int  # exact_duplicates + near_duplicates
    exact_duplicates: int
    near_duplicates: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    turns: dict[str, int]  # accepted samples per number of turns (a JSON key: a string)
    scripts: dict[str, float]  # share of letters per writing system
    train: int
    val: int
    # The rehearsal's answers only:
    unfinished: int | None = None  # accepted answers stopped by max_new_tokens, not by the model
    prompts: str | None = None  # the prompts file
    max_new_tokens: int | None = None

    @model_serializer(mode="wrap")
    def _own_fields(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Without the other kind's fields: files have no prompts, answers no shards or hash. So stats.json and
        Prefect's stored ingest result keep the shape they had as plain dicts."""
        left_out = ANSWERS_ONLY if self.prompts is None else FILES_ONLY
        return {name: value for name, value in handler(self).items() if name not in left_out}


class IngestResult(BaseModel):
    key: str
    folder: str
    samples: str
    quarantine: str
    stats: dict[str, SourceStats]


class TokenizedData(BaseModel):
    key: str
    folder: str
    sft: str
    pretrain: str
    rejected: str
    stats: dict


class StageMix(BaseModel):
    stage: int
    target_share: float
    realised_share: float
    realised_token_share: float
    samples: int
    domain_samples: int
    general_samples: int
    domain_epochs: float  # realised: how many times this stage shows the domain pool
    general_epochs: float
    source_epochs: dict[str, float]  # per source: samples drawn this stage / that source's training rows
    manifest: str


class StageTraining(BaseModel):
    stage: int
    run_id: str
    stage_dir: str
    model_dir: str
    global_step: int
    max_steps: int
    best_step: int | None
    stopped_early: bool
    tokens_per_second: float
    learning_rate: float
    overfit_onset: dict[str, int | None]
    stop_reason: str | None  # why the stage ended before its last step
    # The in-training evaluation of the checkpoint that was restored, and the digest of the weights saved
    # from it: validation reuses the numbers while the weights on disk are these.
    best_losses: TokenLosses | None = None
    weights_digest: str | None = None
    breach_general: float | None = None  # general val loss at a mid-stage forgetting stop: what the gate judges


class TokenLosses(BaseModel):
    """Mean cross-entropy per labelled token (nats), on the domain and the general validation set, and on the
    general_eval sources' rows when the run has any."""

    domain: float
    general: float
    general_eval: float | None = None

    def judged_general(self) -> tuple[str, float]:
        """The general loss drift is judged by: on rows no stage trains on when there are any."""
        return ("general_eval", self.general_eval) if self.general_eval is not None else ("general", self.general)


class AlphaPoint(BaseModel):
    """One interpolation base + alpha * (stage's model - base), measured on each half of the validation rows:
    `choose` picks alpha, `confirm` (rows not used to choose) checks it. Gain and drift are relative to alpha 0
    (the base) on the same half; drift is judged on the set the gate judges (TokenLosses.judged_general)."""

    stage: int
    alpha: float
    choose: TokenLosses
    confirm: TokenLosses
    choose_gain: float = 0.0
    choose_drift: float = 0.0
    confirm_gain: float = 0.0
    confirm_drift: float = 0.0


class Interpolation(BaseModel):
    """What validation.interpolate delivered: `model_dir` holds base + alpha * (stage's model - base); alpha 1
    is the stage's own model, alpha 0 the base (stage 0)."""

    stage: int
    alpha: float
    model_dir: str
    losses: TokenLosses  # of the delivered weights, on the whole validation sets
    points: list[AlphaPoint]
    reason: str


class ByteLosses(BaseModel):
    """Nats per UTF-8 byte of target text: comparable across tokenizers."""

    domain: float
    general: float


class ShareChoice(BaseModel):
    """The adaptive ramp's choice of the next stage's domain share, with the numbers that made it."""

    share: float  # chosen for the next stage
    measured_share: float  # the share of the stage whose numbers chose it
    drift: float  # general drift after that stage, relative to the base model
    added_drift: float  # drift minus the drift before that stage (the base model's is 0)
    budget_left: float  # forgetting budget minus drift
    cost: float  # added_drift, but at least budget / stages: what the rule counts a stage as costing
    room: float | None  # budget_left / cost: stages like the last that still fit; None: a zero budget
    gain: float  # domain gain after that stage, relative to the base model
    added_gain: float
    step: float  # one step of the linear ramp from start to end
    reason: str


class StageReport(BaseModel):
    stage: int
    target_share: float
    realised_share: float
    source_epochs: dict[str, float]
    losses: TokenLosses
    gate: GateDecision
    steps: int
    best_step: int | None
    stopped_early: bool
    stop_reason: str | None
    tokens_per_second: float
    stage_dir: str
    model_dir: str
    run_id: str
    next_share: ShareChoice | None = None  # adaptive ramp only
    task_metrics: dict[str, float] = {}  # task/<source>/<metric> (sources with an eval); gen/* (generation check)


# no_trained_model: no stage passed the gate, the run delivered its base model, which is never registered.
Decision = Literal["skip", "first", "promote", "reject", "no_trained_model"]


class Verdict(BaseModel):
    decision: Decision
    reason: str
    model_name: str
    alias: str
    version: int | None = None  # the challenger's registry version
    champion_version: int | None = None  # who holds the alias after the decision
    challenged: int | None = None  # the champion version the challenger met; None: there was none
    challenger: ByteLosses | None = None
    champion: ByteLosses | None = None
    previous_run: str | None = None  # skip: the successful run whose inputs were the same


class DiskUse(BaseModel):
    """What a finished run left on disk, and what retention removed."""

    run_folder: str
    run_bytes: int
    freed: int  # by run.keep, in this run's folder
    shared: dict[str, int] = {}  # "<what> <folder>": bytes of folders the pipeline's runs share
    collected: int = 0  # freed by run.retention across older runs and unused caches
    collected_items: int = 0


class RunSummary(BaseModel):
    parent_run_id: str
    tracking_uri: str
    experiment: str
    baseline: TokenLosses | None = None  # None: the run was skipped, nothing was trained
    baseline_tasks: dict[str, float] = {}  # the base model's task metrics
    stages: list[StageReport] = []
    final_model: str | None = None
    final_stage: int = 0  # 0: the base model (no stage passed the gate)
    final_losses: TokenLosses | None = None
    stopped_reason: str | None = None
    plots: list[str] = []
    disk: DiskUse | None = None  # None: nothing trained, nothing left
    verdict: Verdict | None = None
    interpolation: Interpolation | None = None  # validation.interpolate: auto
