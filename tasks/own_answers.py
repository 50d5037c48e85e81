"""The base model's own greedy answers, generated once and cached, and why one must not be trained on: shared
by `data.rehearsal: self` (answers to general prompts) and `data.self_distill` (rewrites of domain answers)."""

from __future__ import annotations

import json
from pathlib import Path

from mixtune.core.cache import building, file_digest, fingerprint, mark_complete
from mixtune.core.logs import run_logger
from tasks.answers import MAX_REPEATED_SHARE, repeated_share
from tasks.models import weights_digest
from tasks.probes import answer_probes
from tasks.sources import dominant_script

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def model_digest(base_dir: str) -> str:
    """The weights and the tokenizer: a base model answers through both."""
    files = [Path(base_dir) / name for name in TOKENIZER_FILES]
    return fingerprint(weights_digest(base_dir), [f"{f.name}:{file_digest(f)}" for f in files if f.is_file()])


def cached_answers(
    base_dir: str, prompts: list[str], max_new_tokens: int, batch_size: int, folder: Path, label: str
) -> Path:
    """answers.jsonl in the cache entry `folder`: one row per prompt (a user turn), in order; greedy, so the same
    model always says the same. An entry already complete is read, not generated again."""
    with building(folder) as build:
        if build:
            run_logger().info("%s: the base model answers %d prompts", label, len(prompts))
            asked = [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
            replies = answer_probes(
                base_dir,
                base_dir,
                asked,
                batch_size,
                max_new_tokens=max_new_tokens,
                label=f"{label}: base model answers",
            )
            with (folder / "answers.jsonl").open("w", encoding="utf-8") as out:
                for number, (prompt, reply) in enumerate(zip(prompts, replies), start=1):
                    row = {"line": number, "prompt": prompt, "answer": reply["answer"], "ended": reply["ended"]}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            mark_complete(folder)
        else:
            run_logger().info("%s: answers reused from %s (same model, prompts and settings)", label, folder)
    return folder / "answers.jsonl"


def unusable(answer: str, written_like: str = "", what: str = "its prompt") -> tuple[str, str] | None:
    """(reason, message) when the answer is empty, loops, or is in another script than `written_like` (`what`:
    its prompt, or the reference it rewrites); else None."""
    if not answer.strip():
        return "empty_answer", "the base model gave no answer"
    share = repeated_share(answer)
    if share > MAX_REPEATED_SHARE:
        return "degenerate_answer", f"{share:.0%} of its 6-grams repeat (over {MAX_REPEATED_SHARE:.0%}): a loop"
    expected, answered_in = dominant_script(written_like), dominant_script(answer)
    if expected and answered_in and expected != answered_in:
        return "other_script", f"written in {answered_in}, {what} in {expected}: not an answer to train on"
    return None
