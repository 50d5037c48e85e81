"""A source's counts for tests of the functions that read them (the plan, the checks, the rehearsal's
refusals): the fields a test names, zeros and empties for the rest."""

from tasks.records import SourceStats


def source_stats(role: str = "general", **fields) -> SourceStats:
    empty = {"file": "source.jsonl", "layout": "jsonl", "utf8_bom": False, "formats": {}, "exploded": None}
    counts = dict.fromkeys(
        ("rows_read", "accepted", "duplicates", "exact_duplicates", "near_duplicates", "quarantined", "train", "val"),
        0,
    )
    maps = {"quarantined_by_reason": {}, "turns": {}, "scripts": {}}
    return SourceStats(**{**empty, **counts, **maps, "role": role, **fields})
