"""HMMT answers get the official evaluation's care (lists, thousands, text and `x =`); ZebraLogic choices."""

from __future__ import annotations

import pytest

from npr.eval.checkers import checker, choice_check, hmmt_check, normalise_hmmt
from npr.example import Example


def hmmt(gold: str) -> Example:
    return Example(question="q", answer=gold)


@pytest.mark.parametrize(
    ("gold", "response", "right"),
    [
        ("1, -2", r"The roots are \boxed{-2, 1}.", True),  # a list, in another order
        ("1, -2", r"So $x = \boxed{1}$ or $x = \boxed{-2}$.", True),  # boxed item by item on one line
        ("1, -2", r"\boxed{(1, -2)}", True),  # written as a tuple
        ("1, -2", r"\boxed{\{x = 1, x = -2\}}", True),  # a set of assignments
        ("1, -2", r"\boxed{1 \text{ and } -2}", True),
        ("1, -2", r"\boxed{1}", False),  # an item missing
        ("1, -2", r"\boxed{1, -2, 3}", False),  # an item too many
        ("1, -2", r"\boxed{1, 1}", False),  # each gold item needs its own answer item
        ("1000", r"\boxed{1{,}000}", True),  # thousands separator in a single answer
        ("1000", r"\boxed{1,000 \text{ cm}}.", True),
        (r"\frac{9}{2}", r"\boxed{x = 4.5}", True),
        (r"2\sqrt{3}", r"\boxed{\sqrt{12} \approx 3.46}", True),
        (r"2\sqrt{3}", r"no boxed answer: 2\sqrt{3}", False),
    ],
)
def test_hmmt_check(gold: str, response: str, right: bool) -> None:
    assert hmmt_check(response, hmmt(gold)) is right


def test_hmmt_list_items_are_split_at_top_level_commas() -> None:
    assert normalise_hmmt(r"(1, 2), (3, 4)", as_list=True) == ["(1, 2)", "(3, 4)"]
    assert normalise_hmmt(r"\left[ 1; 2 \right]", as_list=True) == ["1", "2"]


@pytest.mark.parametrize(
    ("response", "right"),
    [(r"\boxed{B}", True), (r"\boxed{b.}", True), (r"\boxed{\text{(B)}}", True), (r"\boxed{Dog}", True),
     (r"\boxed{A}", False), (r"\boxed{cat}", False), ("B", False)],
)  # fmt: skip
def test_choice_check(response: str, right: bool) -> None:
    ex = Example(question="q", answer="B", meta={"choices": ["cat", "dog"]})
    assert choice_check(response, ex) is right


def test_unknown_checker_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown checker 'grid' \(known: \['choice', 'hmmt', 'math'\]\)"):
        checker("grid")
