"""The data report: per source, what was read and what became of every row, how long the samples are in
tokens, how many turns they have and which scripts they are written in. Published as a Prefect markdown
artifact, as MLflow artifacts (JSON, markdown table, PNG histogram) and as MLflow dataset inputs whose
digest is the source's content hash."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from mixtune.core.cache import file_digest
from mixtune.core.config import PipelineConfig
from mixtune.core.retry import retry_unless
from tasks import artifacts
from tasks.plots import plt, save  # tasks.plots selects the Agg backend before pyplot loads
from tasks.readers import IngestError
from tasks.records import IngestResult, SourceStats, TokenizedData
from tasks.tracking import Tracker

TOKENIZE_REASONS = ("too_long", "no_labels")


def source_report(label: str, ingest: SourceStats, tokens: dict | None) -> dict:
    """One source's counts, with rows rejected at tokenisation moved from accepted to quarantined, so that
    accepted + duplicates + quarantined = rows read still holds."""
    tokens = tokens or {}
    late = {reason: tokens.get(reason, 0) for reason in TOKENIZE_REASONS if tokens.get(reason)}
    reasons = {**ingest.quarantined_by_reason, **late}
    return {
        "source": label,
        "role": ingest.role,
        "file": ingest.file,
        "sha256": ingest.sha256,  # a folder's: of its shards; None for the rehearsal's answers
        "layout": ingest.layout,
        "utf8_bom": ingest.utf8_bom,
        "formats": ingest.formats,
        "exploded": ingest.exploded.model_dump() if ingest.exploded else None,
        "rows_read": ingest.rows_read,
        "accepted": ingest.accepted - sum(late.values()),
        "duplicates": ingest.duplicates,
        "near_duplicates": ingest.near_duplicates,
        "quarantined": ingest.quarantined + sum(late.values()),
        "quarantined_by_reason": reasons,
        "train": ingest.train,
        "val": ingest.val,
        "turns": ingest.turns,
        "scripts": ingest.scripts,
        "tokens": {k: v for k, v in tokens.items() if k not in TOKENIZE_REASONS},
    }


def check_quarantine(rows: list[dict], limit: float) -> None:
    """max_quarantine_fraction holds for all of a source's rejects: those of ingest and those of tokenising
    (too_long under `overlong: reject`, no_labels), so a source cannot vanish silently at either step."""
    for r in rows:
        if r["rows_read"] and r["quarantined"] > limit * r["rows_read"]:
            top = ", ".join(f"{k} {v:,}" for k, v in sorted(r["quarantined_by_reason"].items(), key=lambda kv: -kv[1]))
            raise IngestError(
                f"{r['file']}: {r['quarantined']:,} of {r['rows_read']:,} rows quarantined "
                f"({r['quarantined'] / r['rows_read']:.0%} > max_quarantine_fraction {limit:.0%}), "
                f"tokenising included: {top}"
            )


def build_report(data: IngestResult, tokens: TokenizedData) -> list[dict]:
    rows = []
    for label, stats in data.stats.items():
        table = "pretrain" if stats.role == "pretrain" else "sft"
        rows.append(source_report(label, stats, tokens.stats[table].get(label)))
    return rows


def markdown(rows: list[dict], max_len: int) -> str:
    head = (
        "| source | role | read | accepted | duplicates | quarantined (by reason) | turns "
        f"| tokens p50 / p90 / p99 / max | over {max_len} | scripts |"
    )
    lines = ["# Data report", "", head, "|" + " --- |" * 10]
    for r in rows:
        t = r["tokens"]
        lengths = f"{t['p50']} / {t['p90']} / {t['p99']} / {t['max']}" if t else "–"
        over = overlong_cell(t)
        reasons = ", ".join(f"{k} {v}" for k, v in r["quarantined_by_reason"].items())
        turns = ", ".join(f"{k}: {v}" for k, v in r["turns"].items()) if r["role"] != "pretrain" else "–"
        scripts = ", ".join(f"{k} {v:.0%}" for k, v in r["scripts"].items())
        lines.append(
            f"| {r['source']} ({read_as(r)}) | {r['role']} | {r['rows_read']:,} | {r['accepted']:,} "
            f"| {r['duplicates']:,} "
            f"| {r['quarantined']:,} ({reasons or 'none'}) | {turns} | {lengths} | {over} | {scripts} |"
        )
    return "\n".join(lines) + "\n"


def read_as(row: dict) -> str:
    formats = ", ".join(f"{name} {n:,}" for name, n in row["formats"].items())
    text = row["layout"] + (", UTF-8 BOM stripped" if row["utf8_bom"] else "") + (f"; {formats}" if formats else "")
    if row["exploded"]:
        e = row["exploded"]
        text += f"; {e['field']} exploded: {e['rows']:,} rows into {e['samples']:,} samples"
    return text


def overlong_cell(tokens: dict) -> str:
    """SFT samples over max_seq_len are cut or rejected; pre-training text is packed, so nothing is cut."""
    if not tokens:
        return "–"
    if tokens.get("packed"):
        kept = tokens["tokens_kept"] / max(tokens["tokens"], 1)
        return f"packed: {tokens['tokens']:,} tokens in {tokens['blocks']:,} blocks ({kept:.1%} kept)"
    return f"{tokens['over_max_seq_len_share']:.1%}"


def histogram(rows: list[dict], path: Path) -> Path:
    shown = [r for r in rows if r["tokens"]]
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.8 * len(shown) + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], shown):
        hist = r["tokens"]["histogram"]
        edges = hist["edges"]
        ax.bar(
            edges[:-1],
            hist["counts"],
            width=[b - a for a, b in zip(edges, edges[1:])],
            align="edge",
            color="#1f77b4" if r["role"] == "general" else "#d62728" if r["role"] == "domain" else "#777777",
        )
        ax.set_title(f"{Path(r['source']).name} ({r['role']})", fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("tokens per sample (before truncation)")
    return save(fig, path)


def log_datasets(tracker: Tracker, rows: list[dict]) -> None:
    """Each source as an MLflow dataset input: its digest is the content hash the ingest cache keys on."""
    sources = [
        (row["file"], Path(row["source"]).name, row.get("sha256") or file_digest(row["file"]), row["role"])
        for row in rows
    ]
    tracker.log_datasets(sources)


def publish(config: PipelineConfig, tracker: Tracker, data: IngestResult, tokens: TokenizedData) -> tuple[str, Path]:
    folder = Path(tokens.folder)
    rows = build_report(data, tokens)
    check_quarantine(rows, config.data.max_quarantine_fraction)
    text = markdown(rows, config.model.max_seq_len)
    (folder / "data_report.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    (folder / "data_report.md").write_text(text)
    plot = histogram(rows, folder / "token_lengths.png")
    for path in (
        folder / "data_report.json",
        folder / "data_report.md",
        plot,
        Path(data.quarantine),
        Path(tokens.rejected),
    ):
        tracker.log_artifacts(path, "data")
    totals = {f"data_{k}": sum(r[k] for r in rows) for k in ("rows_read", "accepted", "duplicates", "quarantined")}
    tracker.log_metrics(totals, step=0)
    log_datasets(tracker, rows)
    return text, plot


@task(
    name="data-report",
    task_run_name="data report",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless(IngestError),
)
def data_report_task(config: PipelineConfig, tracker: Tracker, data: IngestResult, tokens: TokenizedData) -> str:
    text, plot = publish(config, tracker, data, tokens)
    artifacts.markdown("data-report", text, "What became of every row, per source")
    artifacts.image("token-lengths", plot, "Tokens per sample, per source")
    return text
