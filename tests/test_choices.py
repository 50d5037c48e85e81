"""The loglik_choice task metric: the option letter a model scores highest is its answer; on a tiny real model the
scores match a hand computation, and the accuracy task_metrics reports is the share of rows where the hand's
pick is the reference letter."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.choices import LETTERS, pick_letters
from tasks.validate import task_metrics
from tests.conftest import tiny_config, tiny_hf_model

PROMPTS = [
    [{"role": "user", "content": "Which one?\nA. red\nB. blue\nC. green\nD. black"}],
    [{"role": "user", "content": "Pick the tiny one.\nA. model\nB. registry\nC. a\nD. tiny"}],
    [{"role": "user", "content": "答案是哪一个？\nA. 甲\nB. 乙\nC. 丙\nD. 丁"}],
]


class StubModel(torch.nn.Module):
    """Scores one token far above every other at every position, whatever the input."""

    def __init__(self, vocab: int, favoured: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        self.bias.data[favoured] = 10.0

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        kept = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.bias.expand(input_ids.shape[0], kept, -1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_hf_model(tmp_path_factory.mktemp("mcq") / "model")
    torch.manual_seed(0)
    return str(folder), AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("letter", LETTERS)
def test_the_letter_a_stub_model_scores_highest_is_picked(tiny, letter):
    _, _, tokenizer = tiny
    [favoured] = tokenizer(letter, add_special_tokens=False).input_ids
    picks = pick_letters(StubModel(len(tokenizer), favoured), tokenizer, PROMPTS, batch_size=5)
    assert [p["answer"] for p in picks] == [letter] * len(PROMPTS)


def hand_scores(model, tokenizer, prompt) -> dict[str, float]:
    """One unpadded sequence per letter; position i's log-softmax scores token i + 1."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    context = tokenizer(text, add_special_tokens=False).input_ids
    scores = {}
    for letter in LETTERS:
        tail = tokenizer(letter, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([context + tail])).logits[0]
        scores[letter] = sum(
            torch.log_softmax(logits[len(context) + i - 1], -1)[token].item() for i, token in enumerate(tail)
        )
    return scores


def test_scores_match_a_hand_computation_on_a_tiny_model(tiny):
    _, model, tokenizer = tiny
    picks = pick_letters(model, tokenizer, PROMPTS, batch_size=5)  # batches of 5 mix prompts of unequal length
    for prompt, pick in zip(PROMPTS, picks):
        hand = hand_scores(model, tokenizer, prompt)
        assert pick["scores"] == pytest.approx(hand, abs=1e-4)
        assert pick["answer"] == max(hand, key=hand.get)


def test_task_metrics_report_the_share_of_rows_whose_most_likely_letter_is_the_reference(tiny, tmp_path):
    folder, model, tokenizer = tiny
    mcq = tmp_path / "mcq.csv"
    mcq.write_text("input,output\nq,A\n")  # the source's file; its rows below are what ingest would have made
    source = {"path": str(mcq), "role": "general_eval", "eval": {"metric": "loglik_choice"}}
    source["columns"] = {"prompt": "input", "response": "output"}
    config = tiny_config(tmp_path, data={"sources": [*tiny_config(tmp_path).model_dump()["data"]["sources"], source]})
    references = ["A", "B", "C"]
    ids = [f"m{i}" for i in range(len(PROMPTS))]
    pd.DataFrame({"sample_id": ids, "split": "val", "source": str(mcq)}).to_parquet(tmp_path / "sft.parquet")
    messages = [json.dumps([*p, {"role": "assistant", "content": r}]) for p, r in zip(PROMPTS, references)]
    pd.DataFrame({"sample_id": ids, "messages": messages}).to_parquet(tmp_path / "samples.parquet")
    metrics = task_metrics(config, folder, folder, str(tmp_path / "sft.parquet"), str(tmp_path / "samples.parquet"))
    hand = [hand_scores(model, tokenizer, p) for p in PROMPTS]
    right = sum(max(h, key=h.get) == r for h, r in zip(hand, references))
    assert metrics == {"task/mcq.csv/loglik_choice": right / len(PROMPTS)}
