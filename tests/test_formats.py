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
