"""Records for tests of the functions that read them: a source's counts (the fields a test names, zeros and
empties for the rest), and a stage's request as the flow makes it, for a stage trained on its own."""

from tasks.records import SourceStats, StageMix, TokenLosses
from tasks.requests import StageRequest
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
