"""Every MLflow tag and metric name mixtune writes or reads, named once: the stages that write them, `mixtune
compare`, the registry, the benchmarks and the tests all spell them from here. The strings never change: runs
already recorded, saved searches and dashboards depend on them (tests/test_mlflow_names.py keeps them here).
Beside the seam (tasks/tracking), not in it: a pure module can name a metric without loading MLflow."""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Tag(StrEnum):
    """mixtune's run and model-version tags."""

    FLOW_RUN = "mixtune.flow_run_id"
    STAGE = "mixtune.stage"
    KIND = "mixtune.kind"  # "pipeline" on parent runs: what `mixtune compare` lists
    HOST = "mixtune.host"
    LOCK = "mixtune.lock"
    INPUT_HASH = "mixtune.input_hash"
    RUN_FOLDER = "mixtune.run_folder"  # the folder of the run's stages: a resumed run finds it here
    ABANDONED = "mixtune.abandoned"  # ended KILLED because its process was gone: a rerun may still adopt it
    RESUMED = "mixtune.resumed_from_flow_runs"
    RUN_NAME = "mixtune.run_name"  # config.run.name; MLflow's own run name is MlflowTag.RUN_NAME
    METHOD = "mixtune.method"
    PREFECT_FLOW_RUN_URL = "mixtune.prefect_flow_run_url"
    REGISTERED_MODEL = "mixtune.registered_model"
    LAST_SKIP = "mixtune.last_skip_flow_run"
    # the final report, on the parent run
    FINAL_STAGE = "mixtune.final_stage"
    SCHEDULE = "mixtune.schedule"
    STOPPED_REASON = "mixtune.stopped_reason"
    GUARD_ACTIONS = "mixtune.guard_actions"
    INTERPOLATION_ALPHA = "mixtune.interpolation_alpha"  # validation.interpolate: the delivered alpha
    INTERPOLATION_REASON = "mixtune.interpolation_reason"
    # the gate, on a stage run
    DECISION = "mixtune.decision"  # also a model version's: first, promote or reject
    DECISION_REASON = "mixtune.decision_reason"
    NEXT_SHARE = "mixtune.next_share"
    NEXT_SHARE_REASON = "mixtune.next_share_reason"
    # the retraining verdict, on the parent run
    VERDICT = "mixtune.verdict"
    VERDICT_REASON = "mixtune.verdict_reason"
    MODEL_VERSION = "mixtune.model_version"
    CHAMPION_VERSION = "mixtune.champion_version"
    # a registered model version's
    ARTIFACT_PATH = "mixtune.artifact_path"  # the plain HF folder in the run's artifacts
    DOMAIN_VAL_DIGEST = "mixtune.domain_val_digest"
    CHALLENGER_DOMAIN = "mixtune.challenger_domain"
    CHALLENGER_GENERAL = "mixtune.challenger_general"


@unique
class MlflowTag(StrEnum):
    """MLflow's own tags that mixtune sets or searches by."""

    PARENT_RUN = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"
    SOURCE_NAME = "mlflow.source.name"
    SOURCE_TYPE = "mlflow.source.type"
    USER = "mlflow.user"
    NOTE = "mlflow.note.content"
    DATA_CONTEXT = "mlflow.data.context"


@unique
class Metric(StrEnum):
    """Metrics read back by name: by `mixtune compare`, the gate, the skip check or the benchmarks."""

    TOKENS_PER_SECOND = "tokens_per_second"
    STAGE_TOKENS_PER_SECOND = "stage_tokens_per_second"
    TRAIN_LOSS = "train_loss"
    DOMAIN_VAL_LOSS = "domain_val_loss"
    GENERAL_VAL_LOSS = "general_val_loss"
    BASE_DOMAIN_VAL_LOSS = "base_domain_val_loss"
    BASE_GENERAL_VAL_LOSS = "base_general_val_loss"
    FINAL_DOMAIN_VAL_LOSS = "final_domain_val_loss"
    FINAL_GENERAL_VAL_LOSS = "final_general_val_loss"
    STAGE_DOMAIN_VAL_LOSS = "stage_domain_val_loss"
    STAGE_GENERAL_VAL_LOSS = "stage_general_val_loss"
    GENERAL_DRIFT = "general_drift"
    GENERAL_SPLIT_DRIFT = "general_split_drift"
    GENERAL_EVAL_DRIFT = "general_eval_drift"
    NO_NEW_DATA_TICKS = "no_new_data_ticks"
    # validation.interpolate, on the parent run: the delivered alpha (at step = its stage), and per point tried
    # (at step = its place in the list) its alpha and stage; interpolation_metric names the rest
    INTERPOLATION_ALPHA = "interpolation_alpha"
    INTERPOLATION_ALPHA_TRIED = "interpolation/alpha"
    INTERPOLATION_STAGE = "interpolation/stage"


BASE = "base_"  # a metric of the base model, before any stage
FINAL = "final_"  # a metric of the delivered model (parent run) or of a stage's best model (stage run)
TASK = "task/"  # a task metric's prefix (tasks/probes.py): task/<set>/<scorer>


def val_loss(split: str) -> str:
    """A validation set's loss: domain_val_loss, general_val_loss, general_eval_val_loss."""
    return f"{split}_val_loss"


def interpolation_metric(half: str, measure: str) -> str:
    """A point's measure on one half of the validation rows: interpolation/choose_domain_gain,
    interpolation/confirm_general_drift, ..."""
    return f"interpolation/{half}_{measure}"
