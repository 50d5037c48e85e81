"""`data.rehearsal: self`: the general source, when there is no general data, is the base model's own greedy
answers to a set of general prompts. Fine-tuning then rehearses what the base model already says, and
general drift is measured on answers it gave itself.

The answers are generated once per (base weights and tokenizer, prompts, generation settings). Only prompts
written in the scripts of the run's data are asked (a model that speaks English answers Chinese prompts with
noise). Each answer is accepted, a duplicate of an ingested conversation, or quarantined with a reason
(`empty_answer`, `degenerate_answer`, `other_script`, `duplicate_answer`); accepted answers get the seeded
validation split of any source, which must hold at least MIN_HELD_OUT answers.
The result is the ingested data with this source added: tokenised, mixed and reported like the rest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from mixtune.core.cache import Entry, building, entry_dir, file_digest, fingerprint, mark_complete
from mixtune.core.config import PipelineConfig, SelfRehearsal
from mixtune.core.logs import run_logger
from mixtune.core.retry import retry_unless
from tasks.keys import rehearsal_prompts
from tasks.own_answers import cached_answers, model_digest, unusable
from tasks.readers import IngestError, preview, sample_key, split_hash
from tasks.records import IngestResult, SourceStats
from tasks.sources import (
    check_validation_sets,
    data_scripts,
    in_scripts,
    read_stats,
    script_mix,
    validation_count,
    write_stats,
)
from tasks.tracking import Tracker

REHEARSAL_VERSION = 1
LABEL = "rehearsal:self"
# The gate judges general drift on the held-out answers. Under 16, one answer weighs over 1/16 (6%) of the
# mean loss, more than half the default 10% forgetting budget: one odd answer could decide the gate alone.
MIN_HELD_OUT = 16


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """The first `limit` prompts (all: None): non-blank lines of a .txt file, or the 'prompt' field of JSONL rows."""
    prompts = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            prompts.append(line.strip() if path.suffix == ".txt" else jsonl_prompt(path, number, line))
            if len(prompts) == limit:
                break
    if not prompts:
        raise IngestError(f"{path}: holds no prompts (data.self_rehearsal.prompts)")
    return prompts


def jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        prompt = json.loads(line).get("prompt")
    except (ValueError, AttributeError):
        prompt = None
    if not isinstance(prompt, str) or not prompt.strip():
        raise IngestError(f"{path}: line {number}: expected a JSON object with a non-empty 'prompt' text")
    return prompt.strip()


def asked_prompts(config: PipelineConfig, stats: dict[str, SourceStats]) -> list[str]:
    """The first max_prompts prompts written in the scripts of the ingested sources (`stats`)."""
    path, scripts = rehearsal_prompts(config), data_scripts(stats)
    prompts = in_scripts(read_prompts(path), scripts)[: config.data.self_rehearsal.max_prompts]
    if not prompts:
        raise IngestError(
            f"{path}: no prompt is written in the scripts of the run's data ({', '.join(sorted(scripts))}); "
            "give data.self_rehearsal.prompts in the data's language"
        )
    return prompts


def planned_sizes(config: PipelineConfig, stats: dict[str, SourceStats]) -> dict[str, SourceStats]:
    """What the plan counts the rehearsal source as before it exists: every prompt asked answered and accepted.
    The answers quarantined later shrink the pool; the rehearsal stage says by how much."""
    if config.data.rehearsal == "none":
        return {}
    settings = config.data.self_rehearsal
    answered = len(asked_prompts(config, stats))
    val = validation_count(answered, settings.val_fraction, settings.max_val_samples)
    return {LABEL: answers_stats(config, rehearsal_prompts(config), answered, answered - val, val)}


def answers_key(base_dir: str, prompts: list[str], settings: SelfRehearsal) -> str:
    return fingerprint(REHEARSAL_VERSION, model_digest(base_dir), prompts, settings.max_new_tokens)


def generate(base_dir: str, prompts: list[str], settings: SelfRehearsal, output_dir: str) -> Path:
    """answers.jsonl: one row per prompt, in order (greedy, so the same model always says the same)."""
    folder = entry_dir(output_dir, Entry.REHEARSAL, answers_key(base_dir, prompts, settings))
    return cached_answers(base_dir, prompts, settings.max_new_tokens, settings.batch_size, folder, "rehearsal")


def quarantine_reason(answer: str, earlier: dict[str, int], prompt: str = "") -> tuple[str, str] | None:
    """Why an answer must not be trained on, or None. `earlier`: accepted answers (normalised) -> their line."""
    reason = unusable(answer, prompt)
    if reason:
        return reason
    first = earlier.get(sample_key(answer, "normalized"))
    if first is not None:
        return "duplicate_answer", f"the same answer as line {first}: one answer for many prompts teaches nothing"
    return None


def judge(answers: list[dict], file: str, known_ids: set[str]) -> tuple[list[dict], list[dict], int]:
    """(accepted rows, quarantine records, duplicates of ingested conversations): every answer in one of them."""
    accepted, quarantined, duplicates, earlier = [], [], 0, {}
    for row in answers:
        reason = quarantine_reason(row["answer"], earlier, row["prompt"])
        if reason:
            quarantined.append(quarantine_record(file, row, *reason))
            continue
        messages = orjson.dumps(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]
        ).decode()
        sample_id = sample_key(messages, "exact")
        if sample_id in known_ids:  # as ingest counts it: the conversation is in the data already
            duplicates += 1
            continue
        known_ids.add(sample_id)
        earlier[sample_key(row["answer"], "normalized")] = row["line"]
        accepted.append({"line": row["line"], "messages": messages, "sample_id": sample_id, "ended": row["ended"]})
    return accepted, quarantined, duplicates


def quarantine_record(file: str, row: dict, reason: str, message: str) -> dict:
    """Shaped like ingest's records, so the data report and quarantine.jsonl read both alike."""
    shown = preview({"prompt": row["prompt"], "answer": row["answer"]})
    return {"file": file, "line": row["line"], "reason": reason, "field": "answer", "message": message, "row": shown}


def split(accepted: list[dict], seed: int, settings: SelfRehearsal) -> None:
    """The seeded validation draw of any source: the rows with the smallest split hashes are held out."""
    n_val = validation_count(len(accepted), settings.val_fraction, settings.max_val_samples)
    ranked = sorted(accepted, key=lambda r: split_hash(seed, r["sample_id"]))
    for i, row in enumerate(ranked):
        row["split"] = "val" if i < n_val else "train"


def answers_stats(
    config: PipelineConfig,
    file: Path,
    answered: int,
    train: int,
    val: int,
    *,
    duplicates: int = 0,
    quarantined: dict[str, int] | None = None,
    scripts: dict[str, float] | None = None,
    unfinished: int = 0,
) -> SourceStats:
    """The counts ingest gives a source, so the data report and the plan read this one alike. Every accepted
    answer is train or val; `quarantined`: answers per reason."""
    reasons, accepted = quarantined or {}, train + val
    return SourceStats(
        file=str(file),
        role="general",
        layout=f"answers of the base model to {rehearsal_prompts(config).name}",
        utf8_bom=False,
        formats={},
        exploded=None,
        rows_read=answered,
        accepted=accepted,
        duplicates=duplicates,
        exact_duplicates=duplicates,
        near_duplicates=0,
        quarantined=sum(reasons.values()),
        quarantined_by_reason=reasons,
        turns={"2": accepted} if accepted else {},
        scripts=scripts or {},
        train=train,
        val=val,
        unfinished=unfinished,  # stopped by max_new_tokens, not by the model
        prompts=str(rehearsal_prompts(config)),
        max_new_tokens=config.data.self_rehearsal.max_new_tokens,
    )


def source_stats(config: PipelineConfig, file: Path, answers: list[dict], judged: tuple) -> SourceStats:
    accepted, quarantined, duplicates = judged
    return answers_stats(
        config,
        file,
        len(answers),
        sum(r["split"] == "train" for r in accepted),
        sum(r["split"] == "val" for r in accepted),
        duplicates=duplicates,
        quarantined=dict(Counter(r["reason"] for r in quarantined).most_common()),
        scripts=script_mix([json.loads(r["messages"])[1]["content"][:500] for r in accepted]),
        unfinished=sum(not r["ended"] for r in accepted),
    )


def write_rehearsed(config: PipelineConfig, data: IngestResult, answers_file: Path, folder: Path) -> None:
    answers = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines()]
    known = set(pq.read_table(data.samples, columns=["sample_id"]).column("sample_id").to_pylist())
    judged = judge(answers, str(answers_file), known)
    accepted, quarantined, _ = judged
    split(accepted, config.run.seed, config.data.self_rehearsal)
    copy_samples(data.samples, accepted, folder / "samples.parquet")
    with (folder / "quarantine.jsonl").open("w", encoding="utf-8") as out:
        out.write(Path(data.quarantine).read_text(encoding="utf-8"))
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in quarantined)
    with (folder / "conversations.jsonl").open("w", encoding="utf-8") as out:
        for r in accepted:
            out.write(json.dumps({"line": r["line"], "split": r["split"], "messages": json.loads(r["messages"])}))
            out.write("\n")
    write_stats(folder / "stats.json", {**data.stats, LABEL: source_stats(config, answers_file, answers, judged)})
    mark_complete(folder)


def refuse_unusable(stats: SourceStats) -> None:
    """No accepted answer: the base model cannot rehearse itself, which says more than an empty validation set."""
    if stats.accepted:
        return
    reasons = ", ".join(f"{reason} {n}" for reason, n in stats.quarantined_by_reason.items()) or "none quarantined"
    raise IngestError(
        f"{LABEL}: none of the base model's {stats.rows_read} answers is usable ({reasons}); a model that does "
        "not answer yet has nothing to rehearse: give model.path a model that answers, or pre-train it longer "
        f"(every answer: {stats.file})"
    )


def refuse_too_few_held_out(stats: SourceStats) -> None:
    if stats.val >= MIN_HELD_OUT:
        return
    raise IngestError(
        f"{LABEL}: {stats.val} of {stats.accepted} accepted answers held out, fewer than {MIN_HELD_OUT}: "
        f"too few to judge general drift on (one answer would weigh over {1 / MIN_HELD_OUT:.0%} of the loss); raise "
        "data.self_rehearsal.val_fraction or max_prompts, or give more prompts in the data's language"
    )


def copy_samples(samples: str, accepted: list[dict], path: Path) -> None:
    """The ingested table streamed through, then the rehearsal rows: tokenisation reads one samples table."""
    source = pq.ParquetFile(samples)
    schema = source.schema_arrow
    with pq.ParquetWriter(path, schema) as writer:
        for batch in source.iter_batches(batch_size=8192):
            writer.write_batch(batch)
        if accepted:
            rows = {
                "line": [r["line"] for r in accepted],
                "messages": [r["messages"] for r in accepted],
                "text": [None] * len(accepted),
                "sample_id": [r["sample_id"] for r in accepted],
                "turns": [2] * len(accepted),
                "source": [LABEL] * len(accepted),
                "tag": ["general"] * len(accepted),
                "split": [r["split"] for r in accepted],
            }
            writer.write_table(pa.Table.from_pydict(rows, schema=schema))


def rehearse(config: PipelineConfig, data: IngestResult, base_dir: str) -> IngestResult:
    """The ingested data with the rehearsal source added, as a new cache entry keyed by both."""
    settings = config.data.self_rehearsal
    prompts = asked_prompts(config, data.stats)
    answers = generate(base_dir, prompts, settings, config.run.output_dir)
    split_settings = (config.run.seed, settings.val_fraction, settings.max_val_samples)
    key = fingerprint(REHEARSAL_VERSION, data.key, file_digest(answers), split_settings)
    folder = entry_dir(config.run.output_dir, Entry.REHEARSED, key)
    with building(folder) as build:
        if build:
            write_rehearsed(config, data, answers, folder)
    return IngestResult(
        key=key,
        folder=str(folder),
        samples=str(folder / "samples.parquet"),
        quarantine=str(folder / "quarantine.jsonl"),
        stats=read_stats(folder / "stats.json"),
    )


def track(tracker: Tracker, result: IngestResult, planned: int) -> None:
    """Counts as params and metrics of the parent run, and every answer (accepted or not) as artifacts."""
    stats = result.stats[LABEL]
    tracker.log_params(
        {
            "rehearsal.prompts": stats.prompts,
            "rehearsal.prompts_answered": stats.rows_read,
            "rehearsal.max_new_tokens": stats.max_new_tokens,
        }
    )
    metrics = {
        "rehearsal_rows_read": stats.rows_read,
        "rehearsal_accepted": stats.accepted,
        "rehearsal_duplicates": stats.duplicates,
        "rehearsal_quarantined": stats.quarantined,
        "rehearsal_train": stats.train,
        "rehearsal_val": stats.val,
        "rehearsal_unfinished": stats.unfinished,
    }
    metrics.update({f"rehearsal_quarantined/{k}": v for k, v in stats.quarantined_by_reason.items()})
    metrics["rehearsal_planned_train"] = planned
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifacts(Path(result.folder) / "conversations.jsonl", "data/rehearsal")
    tracker.log_artifacts(stats.file, "data/rehearsal")


# Not cached by Prefect, as the baseline is not: a cached task would skip logging to this run's MLflow run.
# The content-addressed entries make a rerun read the answers instead of generating them again.
@task(
    name="rehearse",
    task_run_name="rehearse",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless(IngestError),
)
def rehearse_task(config: PipelineConfig, data: IngestResult, base_dir: str, tracker: Tracker) -> IngestResult:
    result = rehearse(config, data, base_dir)
    s, planned = result.stats[LABEL], planned_sizes(config, data.stats)[LABEL].train
    track(tracker, result, planned)  # first: the answers and their reasons are in MLflow even when refused below
    refuse_unusable(s)
    refuse_too_few_held_out(s)
    check_validation_sets(result.stats, config.data.min_val_samples, ("general",))
    log = run_logger()
    log.info(
        "%s: %d answered, %d accepted (%d train, %d val), %d duplicate, %d quarantined %s",
        LABEL,
        s.rows_read,
        s.accepted,
        s.train,
        s.val,
        s.duplicates,
        s.quarantined,
        s.quarantined_by_reason or "",
    )
    if s.train < planned:
        log.warning(
            "%s: the plan counted %d general training rows, %d remain after quarantine: the general pool is "
            "repeated more often than planned",
            LABEL,
            planned,
            s.train,
        )
    if s.unfinished:
        log.warning(
            "%s: %d accepted answers stopped at data.self_rehearsal.max_new_tokens %d, not by the model's own end",
            LABEL,
            s.unfinished,
            s.max_new_tokens,
        )
    return result
