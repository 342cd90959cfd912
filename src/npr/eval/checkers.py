r"""Answer checkers of the paper's benchmarks: `check(response_text, example) -> bool` (an `AnswerCheck`).

- ``math`` is math-verify on the last boxed answer (``npr.rewards``, batched): the harness's default.
- ``hmmt`` gives HMMT answers the care the paper's official evaluation gives them (it parses HMMT golds and
  answers with MathArena's answer parser, not the generic one): a gold with a comma is a *list* answer,
  compared as an unordered list, item by item; a list may be boxed item by item on the answer's last boxed
  line; ``\text{…}``, ``\left``/``\right``, thin spaces, ``$`` and a trailing period are dropped; ``x = 3``
  counts as ``3``; an ``\approx`` tail is cut; and in a single answer ``1,000`` is the number 1000.
- ``choice`` scores ZebraLogic's multiple-choice questions: the gold is the letter of the right choice (the
  loader turns the dataset's answer text into it); a boxed letter (``B``, ``(B)``, ``\text{B}``) or the
  choice's own text counts.

Items are still compared by math-verify, through the same process pool and timeout as every reward.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from npr.example import Example
from npr.format import boxed_answers, extract_answer, final_text
from npr.rewards import AnswerCheck, verify

_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_DROP = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "$", r"^\circ", r"^{\circ}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LIST_WORDS = re.compile(r"(?:\\text\s*\{\s*)?\b(?:and|or)\b(?:\s*\})?", re.IGNORECASE)
_CHOICE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside (), [] and {}: `(1,2), 3` has two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _strip_outer_brackets(text: str) -> str:
    r"""`(1, 2)`, `[1, 2]` and `\{1, 2\}` → `1, 2` (a list answer written as a tuple or a set)."""
    text = text.strip()
    if text.startswith("\\{") and text.endswith("\\}"):
        text = f"({text[2:-2]})"
    if text[:1] not in "([" or text[-1:] not in ")]":
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth == 0 and i < len(text) - 1:  # the first bracket closes early: `(1)+(2)`
            return text
    return text[1:-1]


def normalise_hmmt(answer: str, *, as_list: bool) -> list[str]:
    r"""An HMMT answer as the items to compare: one item, or a list's items.

    >>> normalise_hmmt(r"x = 1{,}000\text{ cm}.", as_list=False)
    ['1000']
    >>> normalise_hmmt(r"\left(2, -\frac{1}{3}\right)", as_list=True)
    ['2', '-\\frac{1}{3}']
    """
    text = _LIST_WORDS.sub(",", answer.replace(";", ",")) if as_list else answer
    text = _TEXT.sub("", text)
    for token in _DROP:
        text = text.replace(token, "")
    text = text.replace("{,}", ",").strip().rstrip(".").strip()
    if r"\approx" in text:
        text = text.split(r"\approx")[0]
    if not as_list:
        text = _THOUSANDS.sub("", text)
        return [text.split("=")[-1].strip()] if text.strip() else []
    items = _split_top_level(_strip_outer_brackets(text))
    return [item.split("=")[-1].strip() for item in items]


def _hmmt_answer(text: str, as_list: bool) -> str | None:
    """The answer to compare: the last boxed one, or every boxed item on its line for a list answer."""
    final = final_text(text)
    if not as_list:
        return extract_answer(text)
    lines = [line for line in final.splitlines() if boxed_answers(line)]
    return ", ".join(boxed_answers(lines[-1])) if lines else None


def hmmt_check(text: str, example: Example) -> bool:
    """Whether a response answers an HMMT problem right (see the module docstring)."""
    as_list = "," in example.answer
    answer = _hmmt_answer(text, as_list)
    if answer is None:
        return False
    gold = normalise_hmmt(example.answer, as_list=as_list)
    got = normalise_hmmt(answer, as_list=as_list)
    if not gold or len(got) != len(gold):
        return False
    unmatched = list(range(len(got)))
    for item in gold:  # each gold item takes a distinct answer item: an unordered comparison
        match = next((j for j in unmatched if verify(got[j], item)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def choice_check(text: str, example: Example) -> bool:
    """Whether a response picks the right choice of a multiple-choice question (ZebraLogic)."""
    answer = extract_answer(text)
    if answer is None:
        return False
    answer = _TEXT.sub(lambda m: m.group(1), answer).strip()
    letter = _CHOICE_LETTER.fullmatch(answer)
    if letter is not None:
        return letter.group(1).upper() == example.answer.upper()
    choices = example.meta.get("choices") or []
    right = ord(example.answer.upper()) - ord("A")
    return 0 <= right < len(choices) and answer.casefold() == str(choices[right]).strip().casefold()


CHECKERS: dict[str, Callable[[str, Example], bool] | None] = {
    "math": None,  # the harness's default: batched math-verify on the last boxed answer
    "hmmt": hmmt_check,
    "choice": choice_check,
}
"""Checker name → `AnswerCheck` (None: the default math-verify check)."""


def checker(name: str) -> AnswerCheck | None:
    """The checker called `name`; the error lists the known names."""
    if name not in CHECKERS:
        raise ValueError(f"unknown checker {name!r} (known: {sorted(CHECKERS)})")
    return CHECKERS[name]
