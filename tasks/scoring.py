"""Losses that compare across tokenizers: nats per UTF-8 byte of the target text.

Champion and challenger may tokenize differently (a scratch tokenizer is trained on the data, and the data
changed), so they are compared per byte: the same text whatever the tokenizer. With one tokenizer this ranks
exactly as the per-token loss does: both divide one total by a constant.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from tasks.models import evaluate
from tasks.records import ByteLosses, TokenLosses
from tasks.tables import IGNORE, validation_sets


def target_counts(sft_path: str, tokenizer_dir: str) -> dict[str, tuple[int, int]]:
    """Per validation set: scored tokens (as mean_token_loss counts them) and the UTF-8 bytes they spell."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    counts = {}
    for tag, dataset in validation_sets(sft_path).items():
        targets = [[t for t in labels[1:] if t != IGNORE] for labels in dataset.labels]
        n_bytes = sum(len(tokenizer.decode(ids).encode("utf-8")) for ids in targets)
        counts[tag] = (sum(map(len, targets)), max(n_bytes, 1))
    return counts


def per_byte(per_token: TokenLosses, sft_path: str, tokenizer_dir: str) -> ByteLosses:
    counts = target_counts(sft_path, tokenizer_dir)
    return ByteLosses(**{tag: getattr(per_token, tag) * tokens / n_bytes for tag, (tokens, n_bytes) in counts.items()})


def nats_per_byte(model_dir: str, sft_path: str, batch_size: int) -> ByteLosses:
    return per_byte(evaluate(model_dir, model_dir, sft_path, batch_size), sft_path, model_dir)
