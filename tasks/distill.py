"""`data.self_distill: true` (SDFT, Yang et al., ACL 2024): before training, the base model rewrites each domain
training answer in its own words, given the original as reference, so that fine-tuning moves the model less far
from what it already says. Only a single-turn conversation's answer is rewritten (a rewrite of a later turn would
not see the turns before it), and only training rows: validation keeps the true answers it is judged on.

The rewrites are generated once per (base weights and tokenizer, prompts, generation bound), greedy, through the
fixed TEMPLATE. A rewrite that is empty, loops, is in another script than its reference, was cut short, or drops
a number the reference states is quarantined with its reason, and the row keeps its original answer. The result
is the ingested data with the accepted rewrites in place: same rows, ids and splits, tokenised and mixed as before.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from mixtune.core.cache import Entry, building, entry_dir, file_digest, fingerprint, mark_complete
from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from mixtune.core.retry import retry_unless
from tasks.answers import numbers_in
from tasks.own_answers import cached_answers, model_digest, unusable
from tasks.readers import IngestError
from tasks.records import IngestResult
from tasks.tracking import Tracker

DISTILL_VERSION = 1
TEMPLATE = (
    "Below is an instruction that describes a task, along with a reference answer. Using the reference answer "
    "as a guide, write your own response. Keep every fact and number of the reference.\n\n"
    "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
)
REWRITES = "rewrites.jsonl"


def rewritable(messages: list[dict]) -> bool:
    """One user turn and its answer, maybe after a system turn."""
    roles = [m["role"] for m in messages]
    return roles in (["user", "assistant"], ["system", "user", "assistant"])


def domain_answers(samples: str) -> list[dict]:
    """The domain training rows whose answer is rewritten: sample id, instruction and reference, in table order."""
    table = pq.read_table(samples, columns=["sample_id", "messages", "tag", "split"])
    rows = []
    for sample_id, messages, tag, split in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        turns = json.loads(messages) if messages and tag == "domain" and split == "train" else None
        if turns and rewritable(turns):
            rows.append(
                {"sample_id": sample_id, "instruction": turns[-2]["content"], "reference": turns[-1]["content"]}
            )
    return rows


def rewrite_problem(rewrite: str, reference: str, ended: bool, bound: int) -> tuple[str, str] | None:
    """Why a rewrite must not replace its reference, or None."""
    reason = unusable(rewrite, reference, "its reference")
    if reason:
        return reason
    if not ended:
        return "unfinished", f"stopped at data.self_distill_tokens {bound}, not by the model's own end"
    dropped = numbers_in(reference) - numbers_in(rewrite)
    if dropped:
        return "dropped_numbers", f"the reference's {', '.join(sorted(dropped))} not in the rewrite"
    return None


def judge(rows: list[dict], answers: list[dict], bound: int) -> list[dict]:
    """Per rewritten row: its rewrite, and the reason it was quarantined (None: accepted)."""
    judged = []
    for row, said in zip(rows, answers, strict=True):
        problem = rewrite_problem(said["answer"], row["reference"], said["ended"], bound)
        reason, message = problem or (None, None)
        judged.append({**row, "line": said["line"], "rewrite": said["answer"], "reason": reason, "message": message})
    return judged


def with_rewrites(messages: str, rewrite: str) -> str:
    turns = json.loads(messages)
    turns[-1] = {**turns[-1], "content": rewrite}
    return json.dumps(turns, ensure_ascii=False)


def write_distilled(samples: str, judged: list[dict], folder: Path) -> None:
    """The samples table streamed through with each accepted rewrite in its row's answer; every rewrite, accepted
    or quarantined with its reason, in rewrites.jsonl."""
    accepted = {r["sample_id"]: r["rewrite"] for r in judged if r["reason"] is None}
    source = pq.ParquetFile(samples)
    with pq.ParquetWriter(folder / "samples.parquet", source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=8192):
            columns = batch.to_pydict()
            columns["messages"] = [
                with_rewrites(m, accepted[i]) if i in accepted else m
                for i, m in zip(columns["sample_id"], columns["messages"])
            ]
            writer.write_table(pa.Table.from_pydict(columns, schema=source.schema_arrow))
    with (folder / REWRITES).open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in judged)
    mark_complete(folder)


def distill(config: PipelineConfig, data: IngestResult, base_dir: str) -> IngestResult:
    """The ingested data with the accepted rewrites in place, as a new cache entry keyed by both."""
    rows, bound = domain_answers(data.samples), config.data.self_distill_tokens
    if not rows:
        raise IngestError(
            "data.self_distill: no domain training row is one user turn and its answer, so none can be rewritten; "
            "set data.self_distill: false"
        )
    prompts = [TEMPLATE.format(**r) for r in rows]
    answers_at = entry_dir(
        config.run.output_dir, Entry.DISTILL, fingerprint(DISTILL_VERSION, model_digest(base_dir), prompts, bound)
    )
    answers = cached_answers(base_dir, prompts, bound, config.validation.batch_size, answers_at, "self-distill")
    key = fingerprint(DISTILL_VERSION, data.key, file_digest(answers))
    folder = entry_dir(config.run.output_dir, Entry.DISTILLED, key)
    with building(folder) as build:
        if build:
            said = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
            write_distilled(data.samples, judge(rows, said, bound), folder)
    return data.model_copy(update={"key": key, "folder": str(folder), "samples": str(folder / "samples.parquet")})


def counts(result: IngestResult) -> dict[str, int]:
    """Rows rewritten and kept, and the rewrites quarantined per reason."""
    lines = (Path(result.folder) / REWRITES).read_text(encoding="utf-8").splitlines()
    reasons = Counter(json.loads(line)["reason"] for line in lines)
    accepted = reasons.pop(None, 0)
    quarantined = {f"self_distill_quarantined/{reason}": n for reason, n in reasons.most_common()}
    return {"self_distill_rows": len(lines), "self_distill_rewritten": accepted, **quarantined}


# Not cached by Prefect, as the rehearsal is not: a cached task would skip logging to this run's MLflow run.
@task(
    name="self-distill",
    task_run_name="self-distill",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless(IngestError),
)
def distill_task(config: PipelineConfig, data: IngestResult, base_dir: str, tracker: Tracker) -> IngestResult:
    result = distill(config, data, base_dir)
    numbers = counts(result)
    tracker.log_metrics(numbers, step=0)
    tracker.log_artifacts(Path(result.folder) / REWRITES, "data/self_distill")
    run_logger().info(
        "self-distill: %d domain answers, %d rewritten, the rest kept (%s)",
        numbers["self_distill_rows"],
        numbers["self_distill_rewritten"],
        ", ".join(f"{k.split('/')[1]} {n}" for k, n in numbers.items() if "/" in k) or "none quarantined",
    )
    return result
