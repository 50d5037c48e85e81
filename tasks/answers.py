"""Final answers read out of generated text, for task metrics: the number a GSM8K-style answer ends on, and
the letter of a multiple-choice answer. Pure text functions: every rule is testable on strings."""

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
    if not numbers:
        return None
    try:
        value = Decimal((numbers[0] if marked else numbers[-1]).replace(",", ""))
    except InvalidOperation:
        return None
    value = value.normalize() if value else Decimal(0)
    return format(value, "f")


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
    if metric == "choice":
        chosen = choice_letter(answer)
        return chosen is not None and chosen == choice_letter(reference)
    expected = final_number(reference)
    if expected is None:  # a reference without a number: its whole text is the answer
        return loose(answer) == loose(reference)
    return final_number(answer) == expected
