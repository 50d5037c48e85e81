"""mixtune's fast ChatML pieces are exactly what rendering its chat template through the tokenizer gives."""

import pytest

from tasks.base_model import train_tokenizer
from tasks.chat import chatml_pieces, template_pieces

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "user", "content": "多行\n文本"}, {"role": "assistant", "content": "好的\n\n结束"}],
    # a TRL prompt-completion row whose prompt holds an earlier answer: context, not trained
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red.", "train": False},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Blue."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [turn["content"] for conversation in CONVERSATIONS for turn in conversation]
    return train_tokenizer(texts * 20, 300, tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_pieces_equal_the_rendered_template(tokenizer, messages):
    fast = chatml_pieces(messages)
    assert fast == template_pieces(tokenizer, messages)
    assert [text for text, trained in fast if trained][-1].startswith(messages[-1]["content"])


def test_an_answer_in_the_prompt_is_context_not_trained(tokenizer):
    messages = CONVERSATIONS[-1]
    for pieces in (chatml_pieces(messages), template_pieces(tokenizer, messages)):
        trained = "".join(text for text, is_trained in pieces if is_trained)
        assert "Blue." in trained and "Red." not in trained
