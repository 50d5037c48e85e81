"""What a source's accepted rows are said and checked to be, the same for a file read by ingest and for a
source generated later in the run (data.rehearsal: self)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import TypeAdapter

from tasks.readers import IngestError
from tasks.records import SourceStats

SCRIPTS = {
    "LATIN": re.compile(r"[A-Za-z\u00C0-\u024F]"),
    "CJK": re.compile(r"[\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF]"),
    "CYRILLIC": re.compile(r"[\u0400-\u04FF]"),
    "ARABIC": re.compile(r"[\u0600-\u06FF]"),
    "DEVANAGARI": re.compile(r"[\u0900-\u097F]"),
}
LETTER = re.compile(r"[^\W\d_]")


PER_SOURCE = TypeAdapter(dict[str, SourceStats])


def write_stats(path: Path, stats: dict[str, SourceStats]) -> None:
    path.write_text(json.dumps(PER_SOURCE.dump_python(stats), indent=2, ensure_ascii=False))


def read_stats(path: Path) -> dict[str, SourceStats]:
    return PER_SOURCE.validate_json(path.read_bytes())


def validation_count(accepted: int, val_fraction: float, max_val_samples: int) -> int:
    """How many of a source's accepted rows are held out for validation."""
    return min(max_val_samples, round(val_fraction * accepted))


def script_mix(texts: list[str]) -> dict[str, float]:
    """Share of letters per writing system in a sample of the source (e.g. LATIN 0.62, CJK 0.38)."""
    sample = "".join(texts)
    total = len(LETTER.findall(sample)) or 1
    counts = {name: len(pattern.findall(sample)) for name, pattern in SCRIPTS.items()}
    counts["OTHER"] = max(total - sum(counts.values()), 0)
    return {name: round(n / total, 4) for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n}


def check_validation_sets(
    stats: dict[str, SourceStats], minimum: int, roles: tuple[str, ...] = ("domain", "general")
) -> None:
    """A validation loss over no rows is no measurement (it read 0.0 and passed every gate): refuse it here,
    before anything trains, naming the sources that should have filled the set."""
    for role in roles:
        parts = {label: s for label, s in stats.items() if s.role == role}
        held_out = sum(s.val for s in parts.values())
        if held_out < minimum:
            detail = "; ".join(f"{label}: {s.val} of {s.accepted} accepted row(s)" for label, s in parts.items())
            raise IngestError(
                f"{role} validation set holds {held_out} row(s), fewer than data.min_val_samples {minimum} "
                f"({detail}); add distinct rows or raise val_fraction"
            )


def check_training_sets(stats: dict[str, SourceStats], roles: tuple[str, ...] = ("domain", "general")) -> None:
    """Every stage's mix draws from the domain and the general training rows: none of one role would fail the
    first mix, after pre-training; refuse it here instead."""
    for role in roles:
        parts = {label: s for label, s in stats.items() if s.role == role}
        if not sum(s.train for s in parts.values()):
            detail = "; ".join(f"{name}: {s.train} of {s.accepted} accepted row(s)" for name, s in parts.items())
            raise IngestError(
                f"{role} training set holds no row ({detail or 'no ' + role + ' source'}); add distinct rows or "
                "lower val_fraction"
            )


# A script under this share of a source's letters is quotes and names, not a language the source is written in.
MIN_SCRIPT_SHARE = 0.05


def dominant_script(text: str) -> str | None:
    """The named writing system with most of the text's letters; None for text without letters of one."""
    mix = {name: share for name, share in script_mix([text]).items() if name != "OTHER"}
    return max(mix, key=mix.get) if mix else None


def data_scripts(stats: dict[str, SourceStats]) -> set[str]:
    """The writing systems the run's conversations are written in, from the sources' script mix."""
    return {
        name
        for s in stats.values()
        if s.role != "pretrain"
        for name, share in s.scripts.items()
        if name != "OTHER" and share >= MIN_SCRIPT_SHARE
    }


def in_scripts(prompts: list[str], scripts: set[str]) -> list[str]:
    """The prompts written in one of `scripts` (a prompt without letters, e.g. '17 * 23 = ?', is in any)."""
    return [p for p in prompts if dominant_script(p) in scripts | {None}]
