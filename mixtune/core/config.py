"""The one typed schema: it is `pipeline.yaml`, the CLI's input and the Prefect flow's parameter form.

Relative paths in a YAML file resolve against that file's folder, so a config can travel with its data.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mixtune.core.datafiles import DataPathError, source_files
from mixtune.core.model_code import needs_own_code
from mixtune.core.uris import redact_uri

# general_eval: general conversations the run never trains on, held out whole (up to max_val_samples) to
# measure general drift honestly; a general source's own validation rows share its training distribution.
Role = Literal["general", "domain", "pretrain", "general_eval"]
Share = Annotated[float, Field(ge=0.0, le=1.0)]  # bounds in the JSON schema too: the Prefect server checks them
# No Adam-family recipe peaks above 1. The bound also puts a `maximum` in the deployment's parameter schema, so
# the Prefect server refuses a run's `Infinity` (409) instead of storing it as null, which reads as "unset".
MAX_LEARNING_RATE = 1.0
Format = Literal["auto", "minimind", "openai", "sharegpt", "alpaca", "prompt_completion", "text"]


def form_schema(schema: dict) -> None:
    """The Prefect form reads this schema, and the Prefect server validates run parameters against it.

    Every field gets a title (a nullable sub-model had none, and showed as "Field (Optional)"). A nullable
    scalar that is unset by default is written as its type alone, without the default: the form offers one
    empty input instead of a type switch on which "None" reads 'Property is type "None"', and the form's
    values leave such fields out (form_values). A run may still send null: for a property without a default,
    the server's schema preprocessing adds the null alternative back before it validates a run (an enum
    lists null itself, being checked apart from the type). A deployment's own parameters are checked without
    that preprocessing, so a field whose default is a value keeps its anyOf: its null must stay valid there."""
    for name, prop in schema.get("properties", {}).items():
        prop.setdefault("title", name.replace("_", " ").capitalize())
        alternatives = prop.get("anyOf", [])
        if len(alternatives) != 2 or {"type": "null"} not in alternatives or prop.get("default", 0) is not None:
            continue
        [kept] = [a for a in alternatives if a != {"type": "null"}]
        if "type" in kept:  # a sub-model ($ref) keeps its anyOf: the server adds no null to a $ref
            del prop["anyOf"], prop["default"]
            prop.update(kept)
            if "enum" in prop:
                prop["enum"] = [*prop["enum"], None]


def form_values(config: PipelineConfig) -> dict:
    """The config as the form's initial values: public_dump without the fields left unset (None where None is
    the default), which the flow's validation restores; a null there would show the form's "None" switch."""

    def strip(model: BaseModel, dumped: dict) -> dict:
        kept = {}
        for name, value in dumped.items():
            field, attribute = type(model).model_fields[name], getattr(model, name)
            if value is None and field.default is None:
                continue
            if isinstance(attribute, BaseModel):
                value = strip(attribute, value)
            elif isinstance(attribute, list) and attribute and isinstance(attribute[0], BaseModel):
                value = [strip(item, item_dump) for item, item_dump in zip(attribute, value)]
            kept[name] = value
        return kept

    return strip(config, config.public_dump())


# Learning rates when the config gives none. A scratch preset is tiny and starts from random weights: it
# learns fast at high rates. A pretrained model forgets at those rates (full SFT of a 135M model at 1e-3
# drifted +14.7% on general loss in 4 steps), so it gets the rates its usual recipes use. The three defaults
# cited below were checked against the sources: trl/trainer/sft_config.py (learning_rate 2e-5, overriding
# TrainingArguments' 5e-5), MiniMind's trainer/train_lora.py (--learning_rate 1e-4) and transformers 5.24.
SCRATCH_LR, SCRATCH_PRETRAIN_LR = 1e-3, 3e-3
PRETRAINED_FULL_LR, PRETRAINED_LORA_LR, PRETRAINED_PRETRAIN_LR = 2e-5, 1e-4, 5e-5
LR_SOURCES = {
    "full": "TRL's SFTConfig default; full SFT of small pretrained models is usually run at 1e-5 to 5e-5",
    "lora": "MiniMind's train_lora.py default; peft and QLoRA recipes use 1e-4 to 2e-4",
    "pretrain": "transformers' TrainingArguments default, well below a from-scratch rate",
}


class Strict(BaseModel):
    # No float here means anything as inf or nan (a nan learning rate trains nan losses): refused, naming the field.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, json_schema_extra=form_schema
    )


class Columns(Strict):
    """How flat records with their own keys become a conversation (e.g. {question, answer})."""

    prompt: str | None = Field(None, description="Field holding the user's message.")
    prompt_template: str | None = Field(
        None, description="Instead of prompt: a template over the row's fields, e.g. '{input}\\nA. {A}'."
    )
    response: str = Field(description="Field holding the assistant's answer.")
    system: str | None = Field(None, description="Field holding a system prompt, if any.")
    explode: str | None = Field(
        None,
        description="A field holding a list of records (e.g. instances: [{input, output}]): one sample per item, "
        "the item's keys over the row's other fields.",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> Columns:
        if (self.prompt is None) == (self.prompt_template is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_template'")
        return self


class TaskEval(Strict):
    """A task metric by generation on one source's validation rows, for the base model and after each stage."""

    metric: Literal["exact_match", "choice", "loglik_choice"] = Field(
        description="exact_match: the answer's final number (after ####, else its last number; else its text) "
        "equals the reference's; choice: the answer's letter A-D equals the reference's; loglik_choice (no "
        "generation): of the letters A-D as the answer, the one the model gives the highest log-likelihood "
        "equals the reference's."
    )
    max_samples: int = Field(50, gt=0, description="Validation rows scored (the first by id), so it stays cheap.")
    max_new_tokens: int = Field(64, gt=0, description="Greedy generation bound per answer.")


class Source(Strict):
    """One input: a file on disk, or a family of the embedded generated data."""

    path: str | None = Field(
        None,
        description="A .jsonl, .json, .csv, .parquet or .txt file, maybe compressed (.gz, .zst, .bz2, .xz), or a "
        "folder of shards of one format or saved by datasets' save_to_disk (relative to the config file).",
    )
    split: str | None = Field(None, description="A datasets folder with several splits: the one to read.")
    synthetic: Literal["general", "domain"] | None = Field(
        None, description="Instead of a file: generate the embedded default data of this kind."
    )
    samples: int = Field(2000, gt=0, description="How many conversations to generate (synthetic only).")
    role: Role = Field(
        description="general, domain, pretrain (plain text for continued pre-training), or general_eval (never "
        "trained on: general drift is measured on it)."
    )
    format: Format = Field("auto", description="Row format; auto detects it per row from the keys.")
    columns: Columns | None = Field(None, description="Column mapping for flat records with custom keys.")
    system_prompt: str | None = Field(None, description="A fixed system turn put before every conversation.")
    text_field: str = Field("text", description="Pre-training rows: the field holding the document.")
    text_split: Literal["line", "blank_line"] = Field(
        "line", description=".txt pre-training files: one document per line, or blank-line separated."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Seeded share of this source held out.")
    max_val_samples: int = Field(200, ge=0, description="Cap on held-out rows, so validation stays cheap.")
    eval: TaskEval | None = Field(None, description="A task metric by generation on this source's validation rows.")

    @model_validator(mode="after")
    def _one_origin(self) -> Source:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'path' or 'synthetic'")
        if self.eval and self.role == "pretrain":
            raise ValueError("eval scores answers to conversations: role pretrain has none")
        if self.split is not None and self.path is None:
            raise ValueError("split names a split of a datasets folder: it needs 'path'")
        if self.synthetic and self.role == "pretrain":
            raise ValueError("synthetic data is conversations: role must be general or domain")
        return self

    @property
    def label(self) -> str:
        return self.path or f"synthetic:{self.synthetic}"


class SelfRehearsal(Strict):
    """How `data.rehearsal: self` builds its general source: the base model's own greedy answers to general
    prompts, for when the base model's general SFT data is not at hand."""

    prompts: str | None = Field(
        None,
        description="A prompts file (relative to the config file): .txt, one prompt per line, or .jsonl rows "
        "with a 'prompt' field; unset: the bundled English and Chinese general prompts. Only prompts in the "
        "scripts of the data are asked.",
    )
    max_prompts: int = Field(300, gt=0, description="Prompts answered, the first of the file: bounds generation.")
    max_new_tokens: int = Field(128, gt=0, le=4096, description="Greedy generation bound per answer (tokens).")
    batch_size: int = Field(16, gt=0, description="Prompts answered per batch (left-padded).")
    val_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="Seeded share of the answers held out (at least 16 must be: docs/data.md)."
    )
    max_val_samples: int = Field(200, ge=0, description="Cap on held-out answers, so validation stays cheap.")


class Data(Strict):
    """Where the conversations come from; needs at least one general and one domain source (or only a domain
    source with rehearsal: self)."""

    sources: list[Source] = Field(min_length=1, description="Inputs, each tagged general, domain or pretrain.")
    reasoning: Literal["keep", "drop"] = Field(
        "keep", description="An assistant turn's reasoning_content: kept (as a think block) or dropped."
    )
    dedupe: Literal["exact", "normalized"] = Field(
        "exact", description="normalized also drops near-duplicates (case, whitespace and punctuation aside)."
    )
    overlong: Literal["truncate", "reject"] = Field(
        "truncate", description="Samples over model.max_seq_len tokens: truncated, or quarantined (counted either way)."
    )
    max_quarantine_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Fail before training when a source quarantines more of its rows than this."
    )
    max_row_bytes: int = Field(
        1_000_000, gt=0, description="Rows longer than this (bytes) are quarantined as too_large, unparsed."
    )
    min_val_samples: int = Field(
        1, ge=1, description="Fail before training when the domain or general validation set has fewer rows."
    )
    rehearsal: Literal["none", "self"] = Field(
        "none",
        description="self: a general source made of the base model's own answers to general prompts (for "
        "domain data without general data); none: the general sources alone.",
    )
    self_rehearsal: SelfRehearsal = Field(
        default_factory=SelfRehearsal, description="Prompts and generation of the rehearsal: self source."
    )
    self_distill: bool = Field(
        False,
        description="true: before training, the base model rewrites each domain training answer in its own words, "
        "given the original as reference (greedy, cached); a rewrite that is empty, loops, is cut short or drops "
        "a number of the reference is quarantined and the original kept (docs/data.md: Self-distilled targets).",
    )
    self_distill_tokens: int = Field(256, gt=0, le=4096, description="Greedy generation bound per rewrite (tokens).")

    @model_validator(mode="after")
    def _needs_both_roles(self) -> Data:
        roles = {s.role for s in self.sources}
        # With rehearsal: self the base model answers for the general side, which exists only once it is built.
        missing = {"general", "domain"} - roles - ({"general"} if self.rehearsal == "self" else set())
        if missing:
            raise ValueError(f"needs at least one source with role {' and '.join(sorted(missing))}")
        return self


class Model(Strict):
    """The base model: a local HF folder, or a preset built from scratch with its own tokenizer."""

    preset: Literal["tiny", "small", "minimind2-small"] = Field(
        "tiny", description="Build a model from scratch with these shapes (ignored when path is set)."
    )
    path: str | None = Field(None, description="A local Hugging Face model folder (loaded offline).")
    vocab_size: int | None = Field(
        None, ge=300, description="BPE vocabulary for a scratch tokenizer (preset's if unset)."
    )
    max_seq_len: int = Field(256, ge=16, description="Longer samples are truncated (and counted).")

    @field_validator("preset", mode="before")
    @classmethod
    def _unset_preset(cls, value):
        # `preset: null` beside a path meant "no scratch model"; the preset is ignored then anyway, and the
        # run form gets a plain choice instead of a type switch.
        return "tiny" if value is None else value


class Pretrain(Strict):
    """Continued pre-training: where knowledge goes (SFT only shapes behaviour)."""

    # Three states, not a nullable bool: the run form draws a nullable bool as an off switch, and submitting
    # it untouched sent `false` where the config meant "auto".
    enabled: Literal["auto", True, False] = Field(
        "auto", description="auto: only for a scratch model (no model.path); true/false forces it."
    )
    epochs: float = Field(2.0, gt=0, description="Passes over the pre-training text.")
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=MAX_LEARNING_RATE,
        description="Peak learning rate (cosine decay); unset: 3e-3 from scratch, 5e-5 for model.path.",
    )
    batch_size: int = Field(16, gt=0, description="Samples per optimiser step.")
    max_steps: int | None = Field(
        None, gt=0, description="Cap on optimiser steps (ends the stage early); unset: epochs decide."
    )

    @field_validator("enabled", mode="before")
    @classmethod
    def _unset_is_auto(cls, value):
        return "auto" if value is None else value  # older configs wrote `enabled: null` for auto


class Schedule(Strict):
    """Domain share per stage: about 10% at first, raised stage by stage toward about 50%."""

    start: float = Field(0.1, ge=0.0, le=1.0, description="Domain share of the first stage.")
    end: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Domain share of the last stage. adaptive: the ceiling of its share; unset, 1.0 (domain-only "
        "where drift leaves room: README: Adaptive ramp).",
    )
    stages: int = Field(4, ge=1, le=64, description="Number of stages, each a new mix and a training run.")
    shape: Literal["linear", "step", "cosine", "adaptive"] = Field(
        "linear",
        description="linear: even steps; cosine: slow start and end; step: start, then end halfway; adaptive: "
        "start, then each next share chosen from the measured general drift and domain gain "
        "(docs/training.md: Adaptive ramp).",
    )
    shares: list[Share] | None = Field(
        None, description="An explicit list of per-stage shares; overrides start/end/stages/shape."
    )
    samples_per_stage: int = Field(800, gt=0, description="Training samples drawn for each stage.")
    seed: int | None = Field(
        None,
        description="Seeds which samples each stage draws and their order; unset: run.seed. Varying it alone "
        "keeps the validation split (run.seed) and so the base model's losses.",
    )

    @model_validator(mode="before")
    @classmethod
    def _adaptive_rises_to_domain_only(cls, data):
        # Capped at 0.5, the adaptive ramp cannot learn as much as domain-only where nothing forgets; free to
        # rise, it can, and the forgetting budget still holds it where drift binds (README: Results).
        if isinstance(data, dict) and data.get("shape") == "adaptive" and "end" not in data:
            return {**data, "end": 1.0}
        return data

    @model_validator(mode="after")
    def _shares_in_range(self) -> Schedule:
        if self.shares is not None:
            if not self.shares:
                raise ValueError("shares must not be empty")
            bad = [s for s in self.shares if not 0.0 <= s <= 1.0]
            if bad:
                raise ValueError(f"every share must be within [0, 1], got {bad}")
            if self.shape == "adaptive":
                raise ValueError("shape adaptive chooses every share itself: give shares or shape adaptive, not both")
        if self.shape == "adaptive" and self.end < self.start:
            raise ValueError(f"shape adaptive raises the share from start toward end: end {self.end} < {self.start}")
        return self


class Advisor(Strict):
    """MiniMind's data-volume rules, as thresholds (`mixtune advise`, and the plan with `plan: auto`)."""

    one_epoch_from: int = Field(1_000_000, gt=0, description="About a million samples or more: 1 epoch.")
    three_epochs_below: int = Field(10_000, gt=0, description="Fewer samples (thousands): up to 3 epochs; between: 2.")
    lora_below: int = Field(5_000, gt=0, description="Fewer domain samples than this is scarce data: LoRA.")
    min_steps_per_stage: int = Field(5, gt=0, description="Epoch budgeting never shrinks a stage below this.")
    schedule: Schedule = Field(default_factory=Schedule, description="The staged mix the advisor recommends.")


class Lora(Strict):
    """Low-rank adapters through peft: keeps the base weights, the choice for scarce domain data."""

    r: int = Field(16, gt=0, description="Rank of the low-rank update.")
    alpha: int = Field(32, gt=0, description="Scaling of the update (alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )


class Train(Strict):
    """SFT of each stage: loss on assistant tokens only, through the chat template."""

    method: Literal["full", "lora"] = Field("full", description="full SFT, or LoRA (for scarce data).")
    epochs: float = Field(1.0, gt=0, le=3, description="Passes over each stage's mix (1-3: never more).")
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=MAX_LEARNING_RATE,
        description="Peak learning rate of each stage; unset: by model kind (1e-3 scratch; model.path: 2e-5 full, "
        "1e-4 LoRA).",
    )
    batch_size: int = Field(
        16, gt=0, description="Samples per optimizer step over all devices (each of N devices takes 1/N of them)."
    )
    devices: int = Field(
        1,
        ge=1,
        le=1024,
        description="Processes that train each SFT/LoRA stage (torchrun: one per GPU; gloo processes on CPU). "
        "The same global batch and sample order as one device.",
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Steps whose gradients add up to one update.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of each stage's steps spent warming up.")
    rewarm: bool = Field(True, description="Warm the learning rate up again at every stage (else stage 1 only).")
    stage_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="Stage k trains at learning_rate * stage_lr_decay^(k-1)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate shape within each stage."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, fp32 on CPU (bf16 is 10-100x slower there)."
    )
    logging_steps: int = Field(10, gt=0, description="Log train loss, learning rate and tokens/s every N steps.")
    batching: Literal["grouped", "padded", "packed"] = Field(
        "grouped",
        description="How a step's samples become rows; the loss is the same: grouped: samples of similar length "
        "batched together (sorted within windows of 64 batches of the stage's order, the batches then shuffled "
        "by run.seed), each padded to its batch's longest; padded: the stage's order, padded to the batch's "
        "longest; packed: several samples share rows of packed_row_len (no attention or position crosses a "
        "sample; on CPU attention over a row is dense under a mask). Fastest on CPU, measured: grouped "
        "(README: Speed). Old configs' `packing: true/false` read as packed/padded.",
    )
    packed_row_len: int | None = Field(
        None, ge=16, description="Tokens per row of packed batches; unset: model.max_seq_len."
    )
    keep_checkpoints: int = Field(
        1,
        ge=1,
        le=100,
        description="Sealed checkpoints (weights and optimizer state) a running stage keeps, besides its best one; "
        "a stage's checkpoints are deleted once the next stage has started from its verified final model.",
    )
    lora: Lora = Field(default_factory=Lora)

    @model_validator(mode="before")
    @classmethod
    def _packing_became_batching(cls, data):
        if not isinstance(data, dict) or "packing" not in data:
            return data
        data = dict(data)
        packing = data.pop("packing")
        if "batching" in data:
            raise ValueError("train.packing was replaced by train.batching: give batching alone")
        if not isinstance(packing, bool):
            raise ValueError(f"train.packing (now train.batching) must be true or false, not {packing!r}")
        return {**data, "batching": "packed" if packing else "padded"}

    @model_validator(mode="after")
    def _batch_splits_over_devices(self) -> Train:
        if self.batch_size % self.devices:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over devices {self.devices}: "
                "give a batch_size that is a multiple of devices"
            )
        return self


class Validation(Strict):
    """Domain and general validation during every stage, early stopping, and the forgetting gate."""

    eval_steps: int = Field(20, gt=0, description="Evaluate domain and general validation every N steps.")
    first_eval_step: int = Field(
        5, gt=0, description="The first evaluation of a stage comes after this many steps (then every eval_steps)."
    )
    patience: int = Field(3, ge=1, description="Evaluations without domain improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest domain loss drop that counts as improvement.")
    forgetting_budget: float = Field(
        0.10, ge=0.0, description="Act when general val loss exceeds the base model's by more (relative)."
    )
    stop_mid_stage: bool = Field(
        True,
        description="End a stage at the first evaluation past the forgetting budget, keeping its best checkpoint "
        "from before the breach.",
    )
    on_forgetting: Literal["stop", "hold", "back_off"] = Field(
        "stop",
        description="stop: end with the best model so far; hold: repeat the domain share; "
        "back_off: step the share back one stage.",
    )
    max_guard_actions: int = Field(2, ge=0, description="hold/back_off at most this often, then stop.")
    general_patience: int = Field(
        5, ge=1, description="Evaluations of rising general loss (while train loss falls) that end a stage."
    )
    general_min_delta: float = Field(
        0.02, ge=0.0, description="Smallest general loss rise over its best that counts (absolute, in nats)."
    )
    batch_size: int = Field(32, gt=0, description="Samples per validation forward pass (and probe prompts per batch).")
    probe_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds one model may spend answering all probe prompts; an answer cut short is marked so.",
    )
    generation_prompts: int = Field(
        6,
        ge=0,
        le=100,
        description="Bundled general prompts (in the data's scripts) the base and every stage answer, compared by "
        "length, early stops, loops and format (the generation check); 0: off.",
    )
    generation_tokens: int = Field(48, gt=0, le=1024, description="Greedy bound per generation-check answer.")
    interpolate: Literal["off", "auto"] = Field(
        "off",
        description="auto: after the last stage, deliver base + a * (fine-tuned - base) for the a in "
        "0, 0.25, 0.5, 0.75, 1 with the most domain gain whose general drift stays within forgetting_budget, "
        "chosen on one half of the validation rows and confirmed on the other (docs/training.md: Interpolation).",
    )


# The weights validation.interpolate tries between the base (0) and the fine-tuned model (1).
INTERPOLATION_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Tracking(Strict):
    """MLflow: one parent run per flow run, one nested run per stage."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite in output_dir."
    )
    experiment: str = Field("mixtune", description="MLflow experiment that holds the runs.")
    log_models: bool = Field(True, description="Log each stage's model or adapter as MLflow artifacts.")


class Registry(Strict):
    """Retraining: a run whose inputs did not change ends early; a trained challenger replaces the champion
    only when it is better on domain data and within the forgetting budget on general data."""

    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="MLflow registered model; default: the run name and the domain sources' file names, so only "
        "runs of one pipeline compete for its champion.",
    )
    alias: str = Field(
        "champion",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        description="Registry alias that marks the model to ship; moved only on promotion.",
    )
    skip_unchanged: bool = Field(
        True, description="End without training when data and recipe hash like the last successful run's."
    )
    min_improvement: float = Field(
        0.0, ge=0.0, lt=1.0, description="Relative domain loss drop over the champion needed to promote."
    )


class Deploy(Strict):
    """The Prefect deployments that `mixtune serve` and `mixtune deploy` register."""

    name: str = Field(
        "mixtune",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Deployments are <name>-scheduled (cron) and <name>-manual (UI/API triggers).",
    )
    cron: str | None = Field(None, description="Retraining schedule, e.g. '0 3 * * *'; unset: manual runs only.")
    timezone: str = Field("UTC", description="Time zone the cron schedule is read in.")
    allowed_tracking_uris: list[str] = Field(
        default_factory=list,
        description="Tracking servers that may also get the worker's credentials, besides the served config's own. "
        "A served run's tracking is the deployment's; this list confines runs registered without it.",
    )
    data_roots: list[str] | None = Field(
        None,
        description="Folders served runs may read sources and models from (relative to the config file); "
        "default: the served config's folder. The served config's own inputs are always allowed.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(f"unknown time zone {zone!r}") from None
        return zone

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str | None) -> str | None:
        if cron is None:
            return cron
        # Prefect's own check, imported only when a cron is set: the CLI must reject bad configs fast.
        from prefect._internal.schemas.validators import validate_cron_string

        return validate_cron_string(cron)


class Run(Strict):
    """Naming, output folder, seed, and what runs leave on disk."""

    # It names a folder under output_dir: no separator, and not only dots ("." or ".." would leave it).
    name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
        description="Names the run's folder and MLflow run: letters, digits, _ . - and not only dots.",
    )
    output_dir: str = Field("runs", description="Caches, checkpoints and the default MLflow database.")
    seed: int = Field(0, description="Seeds splits, mixes, initialisation and data order.")
    keep: Literal["delivered", "stages", "all"] = Field(
        "delivered",
        description="What a finished run leaves in its folder besides its records, plots and MLflow's copy of the "
        "model: delivered: the delivered stage's final model only; stages: every stage's final model; all: "
        "every stage's final model and last checkpoints too.",
    )
    retention: int | None = Field(
        None,
        ge=1,
        description="After each run, remove the folders of this pipeline's older runs, keeping the last N, the "
        "champion's and any run that is running or can resume, and caches no kept run used "
        "(`mixtune gc --keep-last N`). Unset: nothing of earlier runs is removed.",
    )


# The run form opens on what people change per run; the rest follows under "More:" titles.
FORM_FIRST = ("data", "schedule", "train", "validation")
FORM_MORE = ("run", "model", "pretrain", "plan", "goal", "registry", "tracking", "deploy", "advisor")
# Where runs go and what a served run may reach belong to the serving side: a deployment fixes these
# sections, and its run form leaves them out (flows/deployments.py, mixtune/core/policy.py).
SERVED_FIXED = ("tracking", "deploy", "advisor")
# Fields a deployment fixes inside sections the form keeps: where a run writes its caches, locks, checkpoints
# and run folders (and the default MLflow database) is the served config's output_dir, not a folder a run names.
SERVED_FIXED_FIELDS = {"run": ("output_dir",)}


def pipeline_form(schema: dict) -> None:
    form_schema(schema)
    properties = schema["properties"]
    for name in FORM_MORE:
        properties[name]["title"] = f"More: {properties[name]['title'].lower()}"
    order = [*FORM_FIRST, *FORM_MORE]
    ranked = sorted(properties, key=lambda n: order.index(n) if n in order else len(order))  # new fields: last
    schema["properties"] = {name: properties[name] for name in ranked}


class PipelineConfig(Strict):
    """A mixtune pipeline: data sources, base model, staged mix, training, validation and tracking."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=pipeline_form)

    run: Run = Field(default_factory=Run)
    data: Data
    model: Model = Field(default_factory=Model)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    schedule: Schedule = Field(default_factory=Schedule)
    train: Train = Field(default_factory=Train)
    validation: Validation = Field(default_factory=Validation)
    tracking: Tracking = Field(default_factory=Tracking)
    registry: Registry = Field(default_factory=Registry)
    deploy: Deploy = Field(default_factory=Deploy)
    plan: Literal["manual", "auto"] = Field(
        "manual", description="auto: method, epochs and schedule come from the advisor's rules."
    )
    goal: Literal["behaviour", "knowledge"] = Field(
        "behaviour", description="knowledge: continued pre-training first (SFT does not add knowledge)."
    )
    advisor: Advisor = Field(default_factory=Advisor)

    @model_validator(mode="after")
    def _scratch_model_is_pretrained(self) -> PipelineConfig:
        if self.pretrain.enabled is False and self.model.path is None:
            raise ValueError(
                "pretrain.enabled: false needs model.path; a scratch model (model.preset) has no weights to "
                "start from before pre-training"
            )
        return self

    def mix_seed(self) -> int:
        return self.run.seed if self.schedule.seed is None else self.schedule.seed

    def train_learning_rate(self) -> tuple[float, str]:
        """The stage learning rate and why: the user's, else the default for this kind of model and method."""
        if self.train.learning_rate is not None:
            return self.train.learning_rate, "set in the config"
        if self.model.path is None:
            return SCRATCH_LR, f"default for a model trained from scratch (preset {self.model.preset})"
        if self.train.method == "lora":
            return PRETRAINED_LORA_LR, f"default for LoRA on a pretrained model ({LR_SOURCES['lora']})"
        return PRETRAINED_FULL_LR, f"default for full SFT of a pretrained model ({LR_SOURCES['full']})"

    def pretrain_learning_rate(self) -> tuple[float, str]:
        if self.pretrain.learning_rate is not None:
            return self.pretrain.learning_rate, "set in the config"
        if self.model.path is None:
            return SCRATCH_PRETRAIN_LR, "default for pre-training a model from scratch"
        return PRETRAINED_PRETRAIN_LR, f"default for continued pre-training ({LR_SOURCES['pretrain']})"

    @property
    def registered_model(self) -> str:
        """Default: the run's name and its domain sources, so unrelated pipelines that share an output folder
        or an experiment never compete for one champion."""
        if self.registry.model_name:
            return self.registry.model_name
        domains = sorted(
            {
                Path(s.path).stem if s.path else f"synthetic-{s.synthetic}"
                for s in self.data.sources
                if s.role == "domain"
            }
        )
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join([self.run.name, *domains]))
        return name if len(name) <= 100 else f"{name[:91]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

    def public_dump(self) -> dict:
        """The config as it may be logged, stored or shown: credentials in URIs redacted."""
        dumped = self.model_dump(mode="json")
        if self.tracking.tracking_uri:
            dumped["tracking"]["tracking_uri"] = redact_uri(self.tracking.tracking_uri)
        dumped["deploy"]["allowed_tracking_uris"] = [redact_uri(u) for u in self.deploy.allowed_tracking_uris]
        return dumped


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and every bad field's path."""


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KB; this cap keeps a hostile one from costing memory
MAX_YAML_NODES = 100_000  # nodes after alias expansion: what yaml.safe_load would build


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is {size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit")
    try:
        raw = bounded_yaml(path.read_text(encoding="utf-8"), path) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    shown = " ".join(item if len(item) <= 200 else f"{item[:200]}…" for item in overrides)
    origin = f"{path} with --set {shown}" if overrides else path
    for item in overrides:
        apply_override(raw, item, origin)
    return validate_config(raw, origin, base_dir=path.resolve().parent)


def apply_override(raw: dict, item: str, origin: Path | str) -> None:
    """`--set train.learning_rate=1e-4`: the value is parsed as YAML so numbers and lists keep their type."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: --set {key}: '{part}' is not a section")
    if len(value.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin}: --set {key}: value over the {MAX_CONFIG_BYTES:,}-byte limit")
    try:
        node[leaf] = bounded_yaml(value, f"{origin}: --set {key}")
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: --set {key}: not valid YAML: {err}") from None


def bounded_yaml(text: str, origin: Path | str) -> object:
    """yaml.safe_load, but refused when alias expansion would build more than MAX_YAML_NODES nodes.

    safe_load expands aliases without bound (a "billion laughs" file grows to gigabytes). Composing keeps
    an alias as a shared node, which costs nothing, so the expanded size is counted on that graph first and
    only a config within the bound is constructed."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        expanded_nodes(root, origin, {}, set())
        return loader.construct_document(root)
    except RecursionError:
        raise ConfigError(f"{origin}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def expanded_nodes(node: yaml.Node, origin: Path | str, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes `node` stands for with every alias expanded; each shared node is counted once."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"{origin}: YAML alias refers to itself (a recursive structure)")
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    total = 1 + sum(expanded_nodes(child, origin, sizes, open_nodes) for child in children)
    if total > MAX_YAML_NODES:
        raise ConfigError(
            f"{origin}: YAML aliases expand to more than {MAX_YAML_NODES:,} nodes (an alias bomb?); refused"
        )
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


def validate_config(raw: dict, origin: Path | str, base_dir: Path | None = None) -> PipelineConfig:
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, origin)) from None
    return resolve_paths(config, base_dir or Path.cwd(), origin)


def format_errors(err: ValidationError, origin: Path | str) -> str:
    lines = [f"{origin}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (misspelt?)")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required, but missing")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {where}: {e['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})")
    return "\n".join(lines)


def model_hint(folder: Path) -> str:
    """What a folder without config.json holds instead, when that says what to do."""
    if folder.is_dir() and any(folder.glob("*.gguf")):
        return (
            "; it holds a .gguf file, a llama.cpp export that transformers cannot train: use the model's "
            "Hugging Face folder (config.json, *.safetensors, tokenizer files)"
        )
    if not folder.exists():
        return "; the folder does not exist"
    return ""


def resolve_paths(config: PipelineConfig, base: Path, origin: Path | str) -> PipelineConfig:
    """Make every path absolute and check that input files exist, before any work starts."""
    missing = []
    for i, source in enumerate(config.data.sources):
        if source.path is None:
            continue
        resolved = resolved_path(base, source.path, f"data.sources.{i}.path", origin)
        source.path = str(resolved)
        if not resolved.exists():
            missing.append(f"  data.sources.{i}.path: file not found: {resolved}")
        elif resolved.is_dir() or source.split is not None:
            try:
                source_files(resolved, source.split)  # a file's own format is checked when it is read
            except DataPathError as err:
                missing.append(f"  data.sources.{i}.{err.field}: {err}")
    prompts = config.data.self_rehearsal.prompts
    if prompts is not None:
        resolved = resolved_path(base, prompts, "data.self_rehearsal.prompts", origin)
        config.data.self_rehearsal.prompts = str(resolved)
        if not resolved.is_file():
            missing.append(f"  data.self_rehearsal.prompts: file not found: {resolved}")
    if config.model.path is not None:
        model_dir = resolved_path(base, config.model.path, "model.path", origin)
        config.model.path = str(model_dir)
        if not (model_dir / "config.json").is_file():
            missing.append(f"  model.path: no Hugging Face model (config.json) in {model_dir}{model_hint(model_dir)}")
        elif own_code := needs_own_code(model_dir):
            missing.append(
                f"  model.path: {model_dir} needs its own Python code ({own_code}); mixtune never runs a model "
                "folder's code: use a model whose architecture transformers ships"
            )
    config.run.output_dir = str(resolved_path(base, config.run.output_dir, "run.output_dir", origin))
    if missing:
        raise ConfigError("\n".join([f"{origin}: missing or unusable input(s)", *missing]))
    return config


def resolved_path(base: Path, path: str, field: str, origin: Path | str) -> Path:
    """`base / path` made absolute; a symlink loop (Path.resolve's RuntimeError) is refused naming the field."""
    try:
        return (base / path).resolve()
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"{origin}: {field}: cannot resolve {base / path}: {err}") from None
