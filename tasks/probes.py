"""Fixed probe prompts answered after every stage, so a person can read how answers change."""

from __future__ import annotations

import json

import pandas as pd
import torch
from transformers import AutoTokenizer

from tasks.models import load_model


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
def answer_probes(model_dir: str, base_dir: str, probes: list[dict], max_new_tokens: int = 48) -> list[dict]:
    model, tokenizer = load_model(model_dir, base_dir), AutoTokenizer.from_pretrained(base_dir)
    model.eval()
    answers = []
    for probe in probes:
        ids = tokenizer.apply_chat_template(
            probe["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        answers.append({**probe, "answer": answer})
    return answers


def format_probes(title: str, answers: list[dict]) -> str:
    lines = [f"# {title}: probe answers", ""]
    for a in answers:
        lines += [
            f"## {a['set']}: {a['prompt'][-1]['content']}",
            f"- reference: {a['reference']}",
            f"- model: {a['answer']}",
            "",
        ]
    return "\n".join(lines)
