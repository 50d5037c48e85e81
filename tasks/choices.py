"""Multiple choice by log-likelihood (TaskEval metric `loglik_choice`), the way small models are evaluated: no
generation; each option letter is scored as the assistant's answer to the prompt, and the most likely is the
model's pick.

The letter, not the option's text, is what is scored: the rows carry their options inside the prompt (a
prompt_template over A-D columns), their reference answer is the letter, and a model fine-tuned on them learns
to answer with the letter. A letter's score is the summed log-probability of its tokens after the chat
template's generation prompt (context and letter tokenized apart, as lm-evaluation-harness does)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from tasks.callbacks import LiveBar
from tasks.models import load_model

LETTERS = ("A", "B", "C", "D")


@torch.no_grad()
def continuation_logliks(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-probability of each continuation's tokens given its context, a batch of sequences at a time.
    Padded on the left, so every continuation ends the row and only the last positions' logits are computed
    (a 49k vocabulary's logits over whole prompts would take gigabytes); position ids count real tokens only,
    so a padded row is scored as it would be alone."""
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        width, keep = max(len(c) + len(t) for c, t in batch), max(len(t) for _, t in batch) + 1
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (context, tail) in enumerate(batch):
            ids[row, width - len(context) - len(tail) :] = torch.tensor(context + tail)
            mask[row, width - len(context) - len(tail) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=keep).logits.float()
        for row, (_, tail) in enumerate(batch):
            # the last `keep` positions; position i predicts token i + 1, so the tail's come from one before it
            predicted = logits[row, keep - len(tail) - 1 : keep - 1].log_softmax(-1)
            scores.append(
                predicted[torch.arange(len(tail), device=device), torch.tensor(tail, device=device)].sum().item()
            )
    return scores


def letter_pairs(tokenizer, prompts: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(context, letter) token ids for every prompt and letter, prompt-major."""
    letters = [tokenizer(letter, add_special_tokens=False).input_ids for letter in LETTERS]
    pairs = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        context = tokenizer(text, add_special_tokens=False).input_ids
        pairs += [(context, tail) for tail in letters]
    return pairs


def pick_letters(model, tokenizer, prompts: list[list[dict]], batch_size: int) -> list[dict]:
    """Per prompt: the letter with the highest log-likelihood (the first on a tie) and every letter's score."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = continuation_logliks(model, letter_pairs(tokenizer, prompts), pad_id, batch_size)
    picks = []
    for start in range(0, len(scores), len(LETTERS)):
        own = dict(zip(LETTERS, scores[start : start + len(LETTERS)]))
        picks.append({"answer": max(own, key=own.get), "scores": own})
    return picks


def answer_by_loglik(model_dir: str, base_dir: str, rows: list[dict], batch_size: int, label: str) -> list[dict]:
    """`rows` (prompt, reference) with the model's pick as its answer."""
    model, tokenizer = load_model(model_dir, base_dir), AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    answers = []
    with LiveBar(label, len(rows)) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            picks = pick_letters(model, tokenizer, [r["prompt"] for r in batch], batch_size * len(LETTERS))
            answers += [{**row, **pick} for row, pick in zip(batch, picks)]
            bar.advance(len(batch))
    return answers
