import re

import pytest

from tasks.formats import RowError, detect_format, to_conversation, to_text

USER_ASSISTANT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "minimind"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "openai"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "sharegpt"),
        ({"instruction": "hi", "input": "", "output": "hello"}, "alpaca"),
    ],
)
def test_every_format_normalises_to_the_same_conversation(row, fmt):
    assert detect_format(row) == fmt
    assert to_conversation(row, "auto") == USER_ASSISTANT
    assert to_conversation(row, fmt) == USER_ASSISTANT


def test_sharegpt_is_told_from_minimind_by_inner_keys():
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    minimind = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert detect_format(sharegpt) == "sharegpt"
    assert detect_format(minimind) == "minimind"
    with pytest.raises(RowError) as err:
        to_conversation(sharegpt, "minimind")
    assert err.value.reason == "missing_field"


def test_alpaca_input_and_system_become_turns():
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be brief."}
    turns = to_conversation(row, "alpaca")
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    assert turns[1]["content"] == "Translate\n\nbonjour"


def test_multi_turn_with_system_is_kept_in_order():
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            *USER_ASSISTANT,
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "sure"},
        ]
    }
    assert [t["role"] for t in to_conversation(row, "auto")] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "row, reason",
    [
        ([1, 2], "not_object"),
        ("text", "not_object"),
        ({"foo": 1}, "unknown_format"),
        ({"messages": "nope"}, "missing_field"),
        ({"messages": []}, "empty_conversation"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant"),
        ({"messages": [*USER_ASSISTANT, {"role": "user", "content": "more?"}]}, "trailing_turn"),
        ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}, "empty_content"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "missing_field"),
        ({"messages": ["user: hi"]}, "bad_turn"),
        ({"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]}, "unknown_role"),
        ({"instruction": "q"}, "missing_field"),
        ({"instruction": "q", "output": "a", "input": 3}, "wrong_type"),
        ({"messages": [{"role": "user", "content": "a\x00b"}, {"role": "assistant", "content": "c"}]}, "nul_character"),
    ],
)
def test_bad_rows_raise_a_reason_code(row, reason):
    with pytest.raises(RowError) as err:
        to_conversation(row, "auto")
    assert err.value.reason == reason
    assert str(err.value)


def test_pretraining_text_rows():
    assert to_text({"text": "a document"}, "auto") == "a document"
    assert to_text("a line", "text") == "a line"
    with pytest.raises(RowError):
        to_text({"body": "x"}, "auto")


def test_trl_prompt_completion_plain_and_conversational():
    plain = {"prompt": "The sky is", "completion": " blue."}
    assert detect_format(plain) == "prompt_completion"
    assert to_conversation(plain, "auto") == [
        {"role": "user", "content": "The sky is"},
        {"role": "assistant", "content": " blue."},
    ]
    chat = {
        "prompt": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another?"},
        ],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    assert detect_format(chat) == "prompt_completion_chat"
    turns = to_conversation(chat, "prompt_completion")
    # the loss is on the completion only: an answer inside the prompt is context
    assert [t.get("train", True) for t in turns if t["role"] == "assistant"] == [False, True]
    assert turns[-1] == {"role": "assistant", "content": "Blue."}


@pytest.mark.parametrize(
    "row, reason, says",
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference_row", "TRL preference row (prompt, chosen"),
        ({"chosen": [], "rejected": []}, "preference_row", "DPO-style"),
        ({"prompt": "p"}, "prompt_only", "prompt-only"),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]}, "wrong_type", "both text or both"),
        (
            {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "c"}]},
            "bad_turn",
            "",
        ),
        ({"completion": "c"}, "missing_field", "needs its 'prompt'"),
    ],
)
def test_trl_rows_mixtune_cannot_train_on_say_why(row, reason, says):
    with pytest.raises(RowError, match=re.escape(says)) as err:
        to_conversation(row, "auto")
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"question": "q", "answer": "a"}, "pair question/answer"),
        ({"id": "x1", "query": "q", "response": "a", "score": 3}, "pair query/response"),
        ({"input": "q", "output": "a"}, "pair input/output"),
        ({"instruction": "q", "response": "a"}, "pair instruction/response"),
    ],
)
def test_common_key_pairs_are_read_and_named(row, fmt):
    assert detect_format(row) == fmt
    assert [t["role"] for t in to_conversation(row, "auto")] == ["user", "assistant"]


def test_a_pair_with_a_system_field_keeps_it_as_the_system_turn():
    turns = to_conversation({"system": "Be terse.", "question": "q", "answer": "a"}, "auto")
    assert turns[0] == {"role": "system", "content": "Be terse."}


@pytest.mark.parametrize(
    "row, line",
    [
        (
            {"question": "q", "answer": "a", "response": "r"},
            "columns: {prompt: question, response: answer} or columns: {prompt: question, response: response}",
        ),
        (
            {"query": "q", "laws": ["l1"], "response": "r"},
            "columns: {prompt: query, response: response} or, to use laws too, columns: {prompt_template: "
            '"{query}\\n{laws}", response: response}',
        ),
        ({"ask": "q", "reply": "r"}, "columns: {prompt: ask, response: reply}"),
    ],
)
def test_ambiguous_or_unknown_keys_are_refused_with_the_columns_line(row, line):
    with pytest.raises(RowError) as err:
        detect_format(row)
    assert err.value.reason in ("ambiguous_format", "unknown_format")
    assert line in str(err.value)
