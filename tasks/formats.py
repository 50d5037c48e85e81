"""Row formats -> one conversation schema: a list of {"role", "content"} turns.

Pure functions, no I/O: every way a row can be wrong raises RowError with a reason code,
so ingest can quarantine it with its file and line instead of crashing.
"""

from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")
# C0 controls other than tab, newline and carriage return, and DEL: never meaningful in training text.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """`raw`: what a reader kept of a row it refused before parsing it into a record, for the quarantine."""

    def __init__(self, reason: str, message: str, field: str | None = None, raw: object = None):
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.raw = raw

    def __reduce__(self):  # a worker process hands rejected rows back pickled
        return RowError, (self.reason, self.args[0], self.field, self.raw)


# Everyday prompt/response key pairs, read without a `columns` mapping when a row matches exactly one.
PAIRS = (
    ("question", "answer"),
    ("question", "response"),
    ("query", "response"),
    ("query", "answer"),
    ("prompt", "response"),
    ("prompt", "answer"),
    ("input", "output"),
    ("instruction", "response"),
    ("instruction", "answer"),
)
# Fields beside a pair that say nothing to the model: a row with any other text field is ambiguous (is it
# part of the prompt?), and gets the `columns` line to write instead of a guess.
PAIR_METADATA = {"id", "idx", "uid", "uuid", "source", "category", "type", "task", "split", "lang", "language"}
PREFERENCE_KEYS = ("chosen", "rejected")


def detect_format(row: object) -> str:
    """Decide by the keys: ShareGPT's `conversations` hold from/value, MiniMind's role/content; TRL's
    prompt-completion rows hold text or message lists; a common key pair is read when it is unambiguous."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"row is a JSON {type(row).__name__}, not an object")
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        turns = row["conversations"]
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and "from" in first:
            return "sharegpt"
        return "minimind"
    if "completion" in row or any(row.get(key) is not None for key in PREFERENCE_KEYS):
        return trl_format(row)
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    if ("instruction" in row or "output" in row) and not pair_matches(row):
        return "alpaca"  # an Alpaca row short of a field: missing_field names it
    return pair_format(row)


def pair_matches(row: dict) -> list[tuple[str, str]]:
    """The pairs whose both keys hold a value (a Parquet row's null column is no key of it), else those whose
    keys are there at all: then a null answer is named as such."""
    held = [pair for pair in PAIRS if row.get(pair[0]) is not None and row.get(pair[1]) is not None]
    return held or [pair for pair in PAIRS if pair[0] in row and pair[1] in row]


def trl_format(row: dict) -> str:
    """Parquet and Arrow rows hold every column of their file: a null is a field the row does not have."""
    held = [key for key in ("prompt", *PREFERENCE_KEYS) if row.get(key) is not None]
    if set(held) & set(PREFERENCE_KEYS):
        raise RowError(
            "preference_row",
            f"a TRL preference row ({', '.join(held)}): it trains DPO-style, not SFT; give prompt-completion rows "
            "or conversations",
        )
    if "prompt" not in row:
        raise RowError("missing_field", "a TRL completion row needs its 'prompt'", "prompt")
    return "prompt_completion_chat" if isinstance(row["prompt"], list) else "prompt_completion"


def pair_format(row: dict) -> str:
    """`pair question/answer` and the like, or a RowError that says which `columns` line reads the row."""
    keys = set(row)
    if keys - PAIR_METADATA == {"prompt"}:
        raise RowError("prompt_only", "a TRL prompt-only row: no completion or answer to train on", "prompt")
    matches = pair_matches(row)
    if not matches:
        raise RowError("unknown_format", f"no known format has keys {sorted(row)[:8]}{columns_hint(row)}")
    if len(matches) > 1:
        lines = " or ".join(f"columns: {{prompt: {p}, response: {r}}}" for p, r in matches)
        raise RowError(
            "ambiguous_format", f"keys match {len(matches)} prompt/response pairs; add to this source {lines}"
        )
    prompt, response = matches[0]
    extra = sorted(k for k in keys - {prompt, response, "system"} - PAIR_METADATA if isinstance(row[k], str | list))
    if extra:
        fields = "\\n".join(f"{{{k}}}" for k in [prompt, *extra])
        raise RowError(
            "ambiguous_format",
            f"keys {prompt}/{response} with {', '.join(extra)} beside them (part of the prompt?); add to this source "
            f"columns: {{prompt: {prompt}, response: {response}}} or, to use {', '.join(extra)} too, "
            f'columns: {{prompt_template: "{fields}", response: {response}}}',
        )
    return f"pair {prompt}/{response}"


def columns_hint(row: dict) -> str:
    texts = [key for key, value in row.items() if isinstance(value, str)]
    if len(texts) < 2:
        return ""
    return f"; if {texts[0]} is the prompt and {texts[-1]} the answer, add to this source: " + (
        f"columns: {{prompt: {texts[0]}, response: {texts[-1]}}}"
    )


def to_conversation(
    row: object, fmt: str, mapping: dict | None = None, reasoning: str = "keep", characters: bool = True
) -> list[dict[str, str]]:
    """One row as a checked conversation. `mapping` reads flat records with custom keys:
    {"prompt": key or None, "prompt_template": "...{key}...", "response": key, "system": key, "system_prompt": str}.
    """
    if not isinstance(row, dict):
        raise RowError("not_object", f"row is a JSON {type(row).__name__}, not an object")
    if mapping is not None:
        return check_conversation(mapped_turns(row, mapping), characters)
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "alpaca":
        turns = alpaca_turns(row)
    elif fmt.startswith("prompt_completion"):
        turns = prompt_completion_turns(row, reasoning)
    elif fmt.startswith("pair "):
        prompt, response = fmt.removeprefix("pair ").split("/")
        turns = mapped_turns(
            row, {"prompt": prompt, "response": response, "system": "system" if "system" in row else None}
        )
    elif fmt == "sharegpt":
        turns = [sharegpt_turn(t, i) for i, t in enumerate(turn_list(row, "conversations"))]
    elif fmt in ("minimind", "openai"):
        key = "conversations" if fmt == "minimind" else "messages"
        turns = [role_content_turn(t, key, i, reasoning) for i, t in enumerate(turn_list(row, key))]
    else:
        raise RowError("wrong_format", f"a {fmt!r} row where a conversation was expected")
    return check_conversation(turns, characters)


def field_text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError("missing_field", f"field '{key}' is missing", key)
    if isinstance(value, float) and value != value:
        raise RowError("empty_field", f"field '{key}' is an empty cell (NaN)", key)
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field '{key}' is a {type(value).__name__}, not text", key)
    return value


class TextList(list):
    """A list field in a prompt_template: `{laws}` is its items, one per line; `{laws[0]}` is one item."""

    def __init__(self, key: str, items: list):
        super().__init__(items)
        self.key = key

    def __getitem__(self, index):
        try:
            item = super().__getitem__(index)
        except IndexError:
            raise RowError("missing_field", f"field '{self.key}' has no item {index}", self.key) from None
        if not isinstance(item, str):
            raise RowError("wrong_type", f"{self.key}[{index}] is a {type(item).__name__}, not text", self.key)
        return item

    def __format__(self, spec: str) -> str:
        return format("\n".join(self[i] for i in range(len(self))), spec)


class TemplateFields(dict):
    """The fields a template names, checked when named: a row's other fields may hold anything."""

    def __init__(self, row: dict):
        super().__init__()
        self.row = row

    def __missing__(self, key: str):
        if isinstance(self.row.get(key), list):
            return TextList(key, self.row[key])
        if key not in self.row:
            raise KeyError(key)
        return field_text(self.row, key)


def mapped_turns(row: dict, mapping: dict) -> list[dict[str, str]]:
    """A flat record's turns, each checked here against the source's own field that fed it: an empty answer
    is `answer (turn[1].content)`, the key a person finds in the file, not only the turn it became."""
    if mapping.get("prompt_template"):
        try:
            prompt = mapping["prompt_template"].format_map(TemplateFields(row))
        except KeyError as err:
            raise RowError("missing_field", f"prompt_template needs field {err}", str(err.args[0])) from None
        origins = [("user", prompt, "prompt_template")]
    else:
        origins = [("user", field_text(row, mapping["prompt"]), mapping["prompt"])]
    origins.append(("assistant", field_text(row, mapping["response"]), mapping["response"]))
    own = field_text(row, mapping["system"]) if mapping.get("system") else ""
    if own and not own.isspace():
        origins.insert(0, ("system", own, mapping["system"]))
    elif mapping.get("system_prompt"):  # the source's fixed system turn, where the row brings none
        origins.insert(0, ("system", mapping["system_prompt"], "system_prompt"))
    for i, (role, content, origin) in enumerate(origins):
        field = f"{origin} (turn[{i}].content)"
        if not content or content.isspace():
            raise RowError("empty_content", f"field '{origin}' is empty (turn {i}, {role})", field)
        check_characters(content, field)
    return [{"role": role, "content": content} for role, content, _ in origins]


def to_text(row: object, fmt: str, field: str = "text") -> str:
    """A pre-training document: `{"text": ...}` rows (plain .txt documents arrive as str)."""
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict) and fmt in ("auto", "text"):
        text = field_text(row, field)
    else:
        raise RowError("wrong_format", f"pre-training rows are {{'{field}': ...}}, got {type(row).__name__}")
    if not text or text.isspace():
        raise RowError("empty_content", "empty text", field)
    check_characters(text, field)
    return text


def check_turn_characters(turns: list[dict[str, str]], serialised: str) -> None:
    """A fast pre-check on the conversation's JSON: control characters can only appear there escaped
    (\\u00XX, \\b, \\f) or as a raw DEL, so the per-turn scan runs only when one of those is present."""
    if "\\u00" in serialised or "\\b" in serialised or "\\f" in serialised or "\x7f" in serialised:
        for i, turn in enumerate(turns):
            check_characters(turn["content"], f"turn[{i}].content")


def check_characters(text: str, field: str) -> None:
    bad = CONTROL.search(text)
    if bad is None:
        return
    if "\x00" in text:
        raise RowError("nul_character", f"{field} holds a NUL character", field)
    raise RowError("control_character", f"{field} holds control character U+{ord(bad.group()):04X}", field)


def turn_list(row: dict, key: str) -> list:
    turns = row.get(key)
    if not isinstance(turns, list):
        raise RowError("missing_field", f"'{key}' must be a list of turns", key)
    return turns


def role_content_turn(turn: object, key: str, index: int, reasoning: str = "keep") -> dict[str, str]:
    field = f"{key}[{index}]"
    if not isinstance(turn, dict):
        raise RowError("bad_turn", f"{field} is not an object", field)
    role, content = turn.get("role"), turn.get("content")
    if role in TOOL_ROLES or turn.get("tool_calls") or turn.get("function_call"):
        raise RowError("tool_turn", f"{field} is a tool/function turn; tool use is not trained yet", field)
    if not isinstance(role, str) or not isinstance(content, str):
        raise RowError("missing_field", f"{field} needs string 'role' and 'content'", field)
    out = {"role": role, "content": content}
    thought = turn.get("reasoning_content")
    if thought is not None and reasoning == "keep":
        if not isinstance(thought, str):
            raise RowError("wrong_type", f"{field}.reasoning_content is not text", f"{field}.reasoning_content")
        if thought.strip():
            out["reasoning_content"] = thought
    return out


def sharegpt_turn(turn: object, index: int) -> dict[str, str]:
    field = f"conversations[{index}]"
    if not isinstance(turn, dict):
        raise RowError("bad_turn", f"{field} is not an object", field)
    speaker, value = turn.get("from"), turn.get("value")
    if not isinstance(speaker, str) or not isinstance(value, str):
        raise RowError("missing_field", f"{field} needs string 'from' and 'value'", field)
    if speaker not in SHAREGPT_ROLES:
        raise RowError("unknown_role", f"{field}.from is {speaker!r}", f"{field}.from")
    return {"role": SHAREGPT_ROLES[speaker], "content": value}


def alpaca_turns(row: dict) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise RowError("missing_field", f"alpaca row needs a string '{key}'", key)
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError("wrong_type", "'input' must be a string", "input")
    prompt = f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        turns.insert(0, {"role": "system", "content": system})
    return turns


def prompt_completion_turns(row: dict, reasoning: str) -> list[dict]:
    """TRL's prompt-completion rows, plain (text) or conversational (message lists). The completion is the
    answer trained on: assistant turns in a conversational prompt are context, marked `train: False`."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if not isinstance(prompt, list) or not isinstance(completion, list):
        raise RowError("wrong_type", "prompt and completion must be both text or both lists of messages", "completion")
    context = [role_content_turn(t, "prompt", i, reasoning) for i, t in enumerate(prompt)]
    answer = [role_content_turn(t, "completion", i, reasoning) for i, t in enumerate(completion)]
    if not answer or any(turn["role"] != "assistant" for turn in answer):
        raise RowError("bad_turn", "completion must be assistant message(s)", "completion")
    return [{**turn, "train": False} if turn["role"] == "assistant" else turn for turn in context] + answer


def check_conversation(turns: list[dict[str, str]], characters: bool = True) -> list[dict[str, str]]:
    """`characters=False` leaves the control-character scan to the caller (see check_turn_characters)."""
    if not turns:
        raise RowError("empty_conversation", "conversation has no turns")
    for i, turn in enumerate(turns):
        if turn["role"] not in ROLES:
            raise RowError("unknown_role", f"turn {i} has role {turn['role']!r}", f"turn[{i}].role")
        if not turn["content"] or turn["content"].isspace():
            raise RowError("empty_content", f"turn {i} ({turn['role']}) is empty", f"turn[{i}].content")
        if characters:
            check_characters(turn["content"], f"turn[{i}].content")
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("no_assistant", "conversation has no assistant turn")
    if turns[-1]["role"] != "assistant":
        raise RowError("trailing_turn", f"conversation ends with a {turns[-1]['role']} turn, not assistant")
    return turns
