"""The chat template, and a conversation as pieces of text that are or are not trained on.

Labels come from the tokenizer's own chat template: the text between "prompt up to turn i" and
"conversation through turn i" is turn i's answer. For mixtune's own ChatML template the same pieces are
built directly in Python, which is much faster than rendering Jinja several times per sample;
tests/test_chat.py checks that both give identical pieces.
"""

from __future__ import annotations

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as MiniMind renders it: <|im_start|>role\ncontent<|im_end|>\n; kept reasoning goes in <think>.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n</think>\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Pieces = list[tuple[str, bool]]  # (text, trained on)


def chatml_pieces(messages: list[dict]) -> Pieces:
    pieces: Pieces = []
    for turn in messages:
        thought = turn.get("reasoning_content")
        body = (f"<think>\n{thought}\n</think>\n" if thought else "") + f"{turn['content']}{EOS}\n"
        pieces.append((f"{BOS}{turn['role']}\n", False))
        pieces.append((body, trained(turn)))
    return merge(pieces)


def template_pieces(tokenizer, messages: list[dict]) -> Pieces:
    """Any chat template that renders a conversation's prefix as a prefix of the whole."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    pieces, done = [], 0
    for i, turn in enumerate(messages):
        if not trained(turn):
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or start < done:
            raise ValueError("the tokenizer's chat template does not render a conversation's prefix as a prefix")
        pieces += [(full[done:start], False), (full[start : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return merge(pieces)


def trained(turn: dict) -> bool:
    """An assistant turn is trained on, unless it is context before the answer (`train: False`: an assistant
    turn in a prompt-completion row's prompt)."""
    return turn["role"] == "assistant" and turn.get("train", True)


def merge(pieces: Pieces) -> Pieces:
    """Adjacent pieces with the same label joined; empty ones dropped."""
    merged: Pieces = []
    for text, label in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == label:
            merged[-1] = (merged[-1][0] + text, label)
        else:
            merged.append((text, label))
    return merged


def pieces_for(tokenizer):
    """The fastest correct way to split this tokenizer's renderings into pieces."""
    if tokenizer.chat_template == CHATML:
        return chatml_pieces
    return lambda messages: template_pieces(tokenizer, messages)
