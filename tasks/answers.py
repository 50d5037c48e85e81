"""Answers read as text: the final answer a task metric scores (the number a GSM8K-style answer ends on, and
the letter of a multiple-choice answer), and how much of an answer repeats itself. Pure text functions."""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

# A thousands-grouped or plain integer part, then an optional decimal part; "3,4" is two numbers, not 34.
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A letter A-D that stands alone: not inside a Latin word ("Bad", "CD"); CJK around it is fine ("答案是C").
LETTER = r"(?<![A-Za-z])([A-D])(?![A-Za-z])"
MARKED = re.compile(r"(?:(?i:answer)|答案|选项|选择|选)\s*(?:is|是|为|:)?\s*:?\s*\(?\s*" + LETTER)
BRACKETED = re.compile(r"[(\[]\s*([A-D])\s*[)\]]")
LEADING = re.compile(r"^\s*" + LETTER + r"\s*(?:$|[.):,、。:]|\s)")


def plain(text: str) -> str:
    """NFKC folds full-width digits, letters and punctuation (１２, Ｂ, （, ：, ，) into ASCII; the minus sign
    U+2212 is folded by hand."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def final_number(text: str) -> str | None:
    """The first number after the last `####`, else the last number in the text; canonical (no grouping
    commas, no trailing decimal zeros), so "1,200.50" and "1200.5" match."""
    text = plain(text)
    marked = "####" in text
    numbers = NUMBER.findall(text.rsplit("####", 1)[1] if marked else text)
    return canonical(numbers[0] if marked else numbers[-1]) if numbers else None


def canonical(number: str) -> str | None:
    """A matched number without grouping commas or trailing decimal zeros: "1,200.50" -> "1200.5"."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    value = value.normalize() if value else Decimal(0)
    return format(value, "f")


def numbers_in(text: str) -> set[str]:
    """Every number the text states, canonical and unsigned, so "1,200" in one text and "1200" in another are
    the same, and so are "1-2 days" and "1 to 2 days" (the hyphen of a range reads as a minus)."""
    return {n for n in (canonical(m.lstrip("-")) for m in NUMBER.findall(plain(text))) if n is not None}


def choice_letter(text: str) -> str | None:
    """The chosen letter: after an answer marker ("answer: B", "答案：C", "选D"), else in brackets ("(B)"),
    else a letter that opens the text ("B. ...", "C、..."); None when none is clear."""
    text = plain(text)
    for pattern in (MARKED, BRACKETED, LEADING):
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


def loose(text: str) -> str:
    return re.sub(r"[\s.,;:!?。，；：！？]+$", "", plain(text).strip()).casefold()


def correct(metric: str, answer: str, reference: str) -> bool:
    if metric in ("choice", "loglik_choice"):  # loglik_choice's answer is the letter the model scored highest
        chosen = choice_letter(answer)
        return chosen is not None and chosen == choice_letter(reference)
    expected = final_number(reference)
    if expected is None:  # a reference without a number: its whole text is the answer
        return loose(answer) == loose(reference)
    return final_number(answer) == expected


# A greedy small model that loops repeats a phrase until max_new_tokens. Over characters (so a loop without
# spaces, "GiveGiveGive", and Chinese count alike), prose repeats under a tenth of its 6-grams and two copies of
# one sentence under half; past half, the answer is the loop, not language.
NGRAM, MAX_REPEATED_SHARE, MIN_NGRAMS = 6, 0.5, 8


def repeated_share(answer: str) -> float:
    """The share of an answer's character 6-grams (case and runs of whitespace aside) that repeat an earlier one."""
    text = " ".join(answer.lower().split())
    grams = [text[i : i + NGRAM] for i in range(len(text) - NGRAM + 1)]
    return 0.0 if len(grams) < MIN_NGRAMS else 1 - len(set(grams)) / len(grams)
