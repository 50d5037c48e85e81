"""Fixed probe prompts answered after every stage, so a person can read how answers change."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from transformers import AutoTokenizer

from tasks.callbacks import LiveBar
from tasks.models import load_model

PROBE_TOKENS = 48


def probe_prompts(sft_path: str, samples_path: str, per_set: int) -> list[dict]:
    """Fixed probes: the first validation samples of each set by id, the same for every stage and re-run."""
    val = pd.read_parquet(sft_path, columns=["sample_id", "tag"], filters=[("split", "==", "val")])
    val = val.sort_values("sample_id")
    chosen = pd.concat([group.head(per_set) for _, group in val.groupby("tag")])
    texts = pd.read_parquet(
        samples_path, columns=["sample_id", "messages"], filters=[("sample_id", "in", chosen["sample_id"].tolist())]
    ).drop_duplicates("sample_id")
    merged = chosen.merge(texts, on="sample_id")
    probes = []
    for tag, messages in zip(merged["tag"], merged["messages"]):
        turns = json.loads(messages)
        probes.append({"set": tag, "prompt": turns[:-1], "reference": turns[-1]["content"]})
    return probes


@torch.no_grad()
def answer_probes(
    model_dir: str,
    base_dir: str,
    probes: list[dict],
    batch_size: int = 8,
    time_bound_s: float | None = None,
    max_new_tokens: int = PROBE_TOKENS,
    label: str = "probe answers",
) -> list[dict]:
    """Greedy answers, a batch of prompts at a time, all within one time bound: a real model's probes once took
    minutes. An answer the bound cut short (or never began) is marked `cut`, so its file can say so."""
    model, tokenizer = load_model(model_dir, base_dir), AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    deadline = None if time_bound_s is None else time.monotonic() + time_bound_s
    answers = []
    with LiveBar(label, len(probes)) as bar:
        for start in range(0, len(probes), batch_size):
            batch = probes[start : start + batch_size]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                answers += [{**probe, "answer": "", "cut": True} for probe in batch]
            else:
                replies = generate_answers(model, tokenizer, [p["prompt"] for p in batch], max_new_tokens, left)
                answers += [{**probe, **reply} for probe, reply in zip(batch, replies)]
            bar.advance(len(batch))
    return answers


@contextmanager
def left_padded(tokenizer) -> Iterator[int]:
    """Padding on the left while generating, so each prompt ends where its answer begins; a tokenizer without a
    pad token pads with EOS (masked out either way). The tokenizer is left as it was found."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    tokenizer.pad_token = pad if pad is not None else tokenizer.eos_token
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, max_time: float | None):
    with left_padded(tokenizer) as pad_id:
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            max_time=max_time,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    # Every row has the batch's length: shorter than max_new_tokens with no EOS means the clock stopped it.
    stopped_by_clock = new.shape[1] < max_new_tokens
    replies = []
    for row in new:
        ended = (row == tokenizer.eos_token_id).any().item()  # else max_new_tokens or the clock stopped it
        replies.append(
            {
                "answer": tokenizer.decode(row, skip_special_tokens=True).strip(),
                "cut": stopped_by_clock and not ended,
                "ended": ended,
            }
        )
    return replies


def format_probes(title: str, answers: list[dict]) -> str:
    lines = [f"# {title}: probe answers", ""]
    for a in answers:
        lines += [
            f"## {a['set']}: {a['prompt'][-1]['content']}",
            f"- reference: {a['reference']}",
            f"- model: {a['answer']}" + (" *[cut short: validation.probe_timeout_s ran out]*" if a.get("cut") else ""),
            "",
        ]
    return "\n".join(lines)
