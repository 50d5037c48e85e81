"""Probe answers are generated in batches, left-padded, with the same greedy answers as one prompt at a time,
within a time bound that marks what it cut."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.probes import answer_probes, format_probes, generate_answers, left_padded
from tests.conftest import tiny_hf_model

PROMPTS = [
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": "a tiny model for the registry, asked a longer question than the others"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tiny registry"}],
    [{"role": "user", "content": "model model model"}],
    [{"role": "user", "content": "for the"}],
]
PROBES = [{"set": "domain", "prompt": prompt, "reference": "ref"} for prompt in PROMPTS]
TOKENS = 16  # enough for answers to differ and for padding to show; generation is what these tests spend


def tiny_model(folder):
    torch.manual_seed(0)
    return str(tiny_hf_model(folder))


@torch.no_grad()
def one_by_one(folder: str, max_new_tokens: int = TOKENS) -> list[str]:
    """The unbatched generation probes used before: one prompt, no padding."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def test_batched_greedy_answers_equal_one_by_one_answers(tmp_path):
    folder = tiny_model(tmp_path / "model")
    expected = one_by_one(folder)
    assert len(set(expected)) > 1  # the prompts get different answers: padding could not hide behind sameness
    for batch_size in (2, 5):
        answers = answer_probes(folder, folder, PROBES, batch_size, time_bound_s=600, max_new_tokens=TOKENS)
        assert [a["answer"] for a in answers] == expected, batch_size
        assert not any(a["cut"] for a in answers)
        assert "cut short" not in format_probes("Base model", answers)


def test_the_time_bound_cuts_answers_and_says_so(tmp_path):
    folder = tiny_model(tmp_path / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    # A bound of a microsecond is spent by the first forward pass: one token each, then generation stops.
    replies = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=TOKENS, max_time=1e-6)
    complete = one_by_one(folder)
    for reply, answer in zip(replies, complete):
        assert reply["cut"] == (reply["answer"] != answer)
    assert any(reply["cut"] for reply in replies)

    spent = answer_probes(folder, folder, PROBES, batch_size=2, time_bound_s=1e-9)  # spent before the first batch
    assert all(a["cut"] and a["answer"] == "" for a in spent)
    assert format_probes("Base model", spent).count("cut short: validation.probe_timeout_s ran out") == len(PROBES)


def test_left_padding_is_restored_and_a_missing_pad_token_is_eos(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(tmp_path / "model"))
    tokenizer.padding_side, tokenizer.pad_token = "right", None
    with left_padded(tokenizer) as pad_id:
        assert tokenizer.padding_side == "left" and pad_id == tokenizer.eos_token_id
        batch = tokenizer(["a", "a tiny model"], padding=True)
        assert batch["input_ids"][0][0] == pad_id and batch["attention_mask"][0][0] == 0
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
