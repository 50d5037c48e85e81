"""Tokenise normalised samples once per (data, tokenizer, max length); every stage and re-run reuses them.

SFT labels cover assistant turns only. They are found through the tokenizer's own chat template: the
characters between "prompt up to turn i" and "conversation through turn i" are turn i's answer, and a
token is trained on when it starts inside such a span. That works for any template that renders a
conversation's prefix as a prefix of the whole, which ChatML-style templates do.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from pydantic import BaseModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mixtune.cache import file_digest, fingerprint, is_complete, prefect_cache_key, mark_complete
from mixtune.paths import cache_dir

TOKENIZE_VERSION = 1
IGNORE = -100


class TokenizedData(BaseModel):
    key: str
    folder: str
    sft: str
    pretrain: str
    stats: dict


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through):
            raise ValueError("the tokenizer's chat template does not render a conversation's prefix as a prefix")
        spans.append((start, len(through)))
    return full, spans


def encode_sft(tokenizer, conversations: list[list[dict]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation, labels -100 outside assistant answers, truncated to max_len."""
    rendered = [assistant_spans(tokenizer, messages) for messages in conversations]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        labels = [tok if any(a <= start < b for a, b in spans) else IGNORE for tok, (start, _) in zip(ids, offsets)]
        out.append((ids[:max_len], labels[:max_len]))
    return out


def encode_plain(tokenizer, texts: list[str], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Pre-training: every token is a label; the document ends with the tokenizer's end-of-sequence token."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [((x + eos)[:max_len], (x + eos)[:max_len]) for x in ids]


def render_for_pretraining(tokenizer, frame: pd.DataFrame) -> list[str]:
    """General conversations enter pre-training as whole rendered text, so a scratch model learns the template."""
    return [
        tokenizer.apply_chat_template(json.loads(m), tokenize=False) if isinstance(m, str) else t
        for m, t in zip(frame["messages"], frame["text"])
    ]


def to_table(frame: pd.DataFrame, pairs: list[tuple[list[int], list[int]]], full_lengths: list[int]) -> pd.DataFrame:
    table = frame[["sample_id", "source", "tag", "split"]].reset_index(drop=True).copy()
    table["input_ids"] = [ids for ids, _ in pairs]
    table["labels"] = [labels for _, labels in pairs]
    table["n_tokens"] = [len(ids) for ids, _ in pairs]
    table["n_labels"] = [sum(t != IGNORE for t in labels) for _, labels in pairs]
    table["truncated"] = [full > len(ids) for full, (ids, _) in zip(full_lengths, pairs)]
    return table


def tokenize_key(ingest_key: str, tokenizer_dir: str, max_len: int) -> str:
    vocab = Path(tokenizer_dir) / "tokenizer.json"
    digest = file_digest(vocab) if vocab.is_file() else tokenizer_dir
    return fingerprint(TOKENIZE_VERSION, ingest_key, digest, max_len)


def tokenize(samples_path: str, ingest_key: str, tokenizer_dir: str, max_len: int, output_dir: str) -> TokenizedData:
    key = tokenize_key(ingest_key, tokenizer_dir, max_len)
    folder = cache_dir(output_dir, "tokens", key)
    result = TokenizedData(key=key, folder=str(folder), sft=str(folder / "sft.parquet"),
                           pretrain=str(folder / "pretrain.parquet"), stats={})
    if is_complete(folder):
        result.stats = json.loads((folder / "stats.json").read_text())
        return result
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    frame = pd.read_parquet(samples_path)
    sft, pretrain = build_sft_table(tokenizer, frame, max_len), build_pretrain_table(tokenizer, frame, max_len)
    unlearnable = sft["n_labels"] == 0
    result.stats = token_stats(sft[~unlearnable], pretrain, int(unlearnable.sum()))
    # A sample whose answer was cut off entirely teaches nothing; it is counted, not silently dropped.
    sft[~unlearnable].to_parquet(result.sft, index=False)
    sft[unlearnable][["sample_id", "source", "tag", "split"]].to_parquet(folder / "no_labels.parquet", index=False)
    pretrain.to_parquet(result.pretrain, index=False)
    (folder / "stats.json").write_text(json.dumps(result.stats, indent=2))
    mark_complete(folder)
    return result


def build_sft_table(tokenizer, frame: pd.DataFrame, max_len: int) -> pd.DataFrame:
    chats = frame[frame["tag"] != "pretrain"]
    pairs = encode_sft(tokenizer, [json.loads(m) for m in chats["messages"]], max_len=1 << 30)
    full_lengths = [len(ids) for ids, _ in pairs]
    return to_table(chats, [(ids[:max_len], labels[:max_len]) for ids, labels in pairs], full_lengths)


def build_pretrain_table(tokenizer, frame: pd.DataFrame, max_len: int) -> pd.DataFrame:
    corpus = frame[(frame["tag"] != "domain") & (frame["split"] == "train")]
    pairs = encode_plain(tokenizer, render_for_pretraining(tokenizer, corpus), max_len=1 << 30)
    full_lengths = [len(ids) for ids, _ in pairs]
    return to_table(corpus, [(ids[:max_len], labels[:max_len]) for ids, labels in pairs], full_lengths)


def token_stats(sft: pd.DataFrame, pretrain: pd.DataFrame, no_labels: int) -> dict:
    stats = {"sft_samples": len(sft), "pretrain_samples": len(pretrain), "no_labels_after_truncation": no_labels,
             "truncated": int(sft["truncated"].sum() + pretrain["truncated"].sum()),
             "tokens_by_tag_split": {}}
    for (tag, split), group in sft.groupby(["tag", "split"]):
        stats["tokens_by_tag_split"][f"{tag}/{split}"] = int(group["n_tokens"].sum())
    stats["samples_by_tag_split"] = dict(Counter(f"{t}/{s}" for t, s in zip(sft["tag"], sft["split"])))
    return stats


@task(name="tokenize", retries=2, retry_delay_seconds=[2, 10], persist_result=True, result_serializer="json",
      cache_key_fn=lambda _ctx, p: prefect_cache_key(
          "tokens", k := tokenize_key(p["ingest_key"], p["tokenizer_dir"], p["max_len"]),
          cache_dir(p["output_dir"], "tokens", k)))
def tokenize_task(samples_path: str, ingest_key: str, tokenizer_dir: str, max_len: int, output_dir: str) -> TokenizedData:
    result = tokenize(samples_path, ingest_key, tokenizer_dir, max_len, output_dir)
    get_run_logger().info("tokenised: %s", result.stats)
    return result
