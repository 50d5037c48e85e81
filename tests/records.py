"""Records for tests of the functions that read them: a source's counts (the fields a test names, zeros and
empties for the rest), a stage's request as the flow makes it, for a stage trained on its own, and a run's."""

from tasks.records import SourceStats, StageMix, TokenLosses
from tasks.requests import RunRequest, StageRequest
from tasks.tracking import Tracker


def source_stats(role: str = "general", **fields) -> SourceStats:
    empty = {"file": "source.jsonl", "layout": "jsonl", "utf8_bom": False, "formats": {}, "exploded": None}
    counts = dict.fromkeys(
        ("rows_read", "accepted", "duplicates", "exact_duplicates", "near_duplicates", "quarantined", "train", "val"),
        0,
    )
    maps = {"quarantined_by_reason": {}, "turns": {}, "scripts": {}}
    return SourceStats(**{**empty, **counts, **maps, "role": role, **fields})


def stage_request(
    config, mix: StageMix, tokens, base: str, stage_dir, tracker: Tracker, baseline: TokenLosses | None = None
) -> StageRequest:
    """Stage `mix.stage` from the base model, on `tokens`' table; no baseline: no mid-stage forgetting stop."""
    return StageRequest(
        config=config,
        mix=mix,
        sft_path=tokens.sft,
        init_dir=base,
        base_dir=base,
        stage_dir=str(stage_dir),
        tracker=tracker,
        baseline=baseline,
    )


def run_request(config, base: str, sft_path: str, baseline: TokenLosses, run_folder, tracker: Tracker | None = None):
    """The run's request; no tracker: one that names the run's folder and nothing MLflow has, for code that only
    reads the folder."""
    tracker = tracker or Tracker(uri="unused", experiment_id="0", parent_run_id="none", run_folder=str(run_folder))
    return RunRequest(config=config, tracker=tracker, base_dir=base, sft_path=sft_path, baseline=baseline)
