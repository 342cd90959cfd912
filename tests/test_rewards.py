"""Answer extraction, math verification (table, timeouts, batch speed) and the stage rewards."""

from __future__ import annotations

import time

import pytest

from npr.data import Example
from npr.format import check
from npr.rewards import (
    Verifier,
    accuracy_reward,
    accuracy_reward_batch,
    extract_answer_or_last_number,
    format_penalty,
    format_penalty_batch,
    stage1_reward,
    stage1_reward_batch,
    stage3_reward,
    stage3_reward_batch,
    verify,
    verify_batch,
)

# (prediction, gold, expected): prediction is a bare answer or a response with \boxed{}.
VERIFY_TABLE = [
    # equivalent forms of one number
    ("1/2", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac12", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\frac{6}{8}", "\\frac{3}{4}", True),
    ("3.0", "3", True),
    ("03", "3", True),
    ("288.0", "288", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1000000", "1,000,000", True),
    ("\\frac{1}{3}", "0.333333", True),
    ("-4", "-4", True),
    ("0012", "12", True),
    ("-0", "0", True),
    ("x = 3", "3", True),
    ("90^\\circ", "90", True),
    ("\\$5", "5", True),
    ("$5$", "5", True),
    ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("(A)", "A", True),
    # percentages (as math-verify treats them)
    ("0.5", "50\\%", True),
    ("0.5", "50%", True),
    ("50\\%", "0.5", True),
    ("50", "50\\%", True),
    # irrationals, symbols, expressions
    ("2^{1/2}", "\\sqrt{2}", True),
    ("1.41421356", "\\sqrt{2}", True),
    ("3.14159265", "\\pi", True),
    ("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}", True),
    ("1+2x", "2x+1", True),
    ("x^{2}", "x^2", True),
    ("-\\infty", "-\\infty", True),
    # intervals and sets
    ("(1,2]", "(1,2]", True),
    ("[0, \\infty)", "[0,\\infty)", True),
    ("\\{2,1\\}", "\\{1,2\\}", True),
    ("2,1", "1,2", True),
    ("[1,2]", "(1,2]", False),
    ("(2,1)", "(1,2)", False),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    # responses: the last \boxed{} of the final text counts
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),
    ("first \\boxed{3}, then \\boxed{4}", "4", True),
    ("first \\boxed{3}, then \\boxed{4}", "3", False),
    ("<takeaway>maybe \\boxed{4}</takeaway>The answer is \\boxed{5}.", "5", True),
    ("the answer is \\boxed{}", "5", False),
    ("the answer is \\boxed{5", "5", False),
    # near misses
    ("4", "-4", False),
    ("3.01", "3", False),
    ("0.33", "1/3", False),
    ("51%", "0.5", False),
    ("\\text{10 apples}", "10", False),
    ("B", "A", False),
    # malformed LaTeX and empty input
    ("\\frac{", "5", False),
    ("\\frac{10}{2", "5", False),
    ("}{", "5", False),
    ("", "5", False),
    ("   ", "5", False),
    ("5", "", False),
]


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"), VERIFY_TABLE, ids=[f"{p!r}~{g!r}" for p, g, _ in VERIFY_TABLE]
)
def test_verify_table(prediction: str, gold: str, expected: bool) -> None:
    assert verify(prediction, gold) is expected


def test_verify_batch_matches_single_calls() -> None:
    pairs = [(p, g) for p, g, _ in VERIFY_TABLE]
    assert verify_batch(pairs) == [e for _, _, e in VERIFY_TABLE]


def test_pathological_input_returns_false_within_timeout() -> None:
    verify("1/2", "0.5")  # workers up: the timeout counts from dispatch, not from process start
    start = time.monotonic()
    assert verify("(" * 10_000 + "1" + ")" * 10_000, "1", timeout=1.0) is False
    assert time.monotonic() - start < 2.5
    assert verify("\\frac{2}{4}", "0.5") is True  # the stuck worker was replaced


def test_pathological_batch_costs_one_timeout_each() -> None:
    frac_tower = "\\frac{" * 3000 + "1" + "}{2}" * 3000  # parses in ~40 s
    power_tower = "2^" * 200 + "2"  # parses fast, compares forever
    pairs = [(frac_tower, "5"), ("\\boxed{7}", "7.0"), (power_tower, "5"), ("1/4", "0.25")]
    start = time.monotonic()
    assert verify_batch(pairs, timeout=2.0) == [False, True, False, True]
    assert time.monotonic() - start < 20.0


def test_thousand_answers_timed() -> None:
    forms = ["\\boxed{{\\frac{{{d}}}{{2}}}}", "{n}.0", "{m}", "x = {n}", "\\frac{{{n}}}{{1}}"]  # m: wrong
    pairs, expected = [], []
    for i in range(1000):
        n = 7 * i - 300
        form = forms[i % len(forms)]
        pairs.append((form.format(n=n, d=2 * n, m=n + 1), str(n)))
        expected.append("{m}" not in form)
    verify("1/2", "0.5")  # workers up
    start = time.monotonic()
    assert verify_batch(pairs) == expected
    elapsed = time.monotonic() - start
    print(f"\nverified 1,000 answers in {elapsed:.2f} s")
    assert elapsed < 60.0  # ~5-15 s on 2 busy cores; one 5 s timeout per answer would take 2,500 s


def test_verifier_replaces_a_dead_worker_and_requeues_its_job() -> None:
    with Verifier(workers=1, timeout=5.0) as verifier:
        assert verifier.verify("1/2", "0.5")
        verifier._workers[0].process.kill()
        verifier._workers[0].process.wait()
        assert verifier.verify_batch([("2/4", "0.5"), ("3", "4")]) == [True, False]
    with pytest.raises(RuntimeError, match="closed"):
        verifier.verify("1/2", "0.5")


@pytest.mark.parametrize(("kwargs", "message"), [({"workers": 0}, "workers"), ({"timeout": 0}, "timeout")])
def test_verifier_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Verifier(**kwargs)


def test_verify_rejects_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0, got 0"):
        verify("1", "1.0", timeout=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{1,2} it is 7", ("1,2", False)),
        ("3 + 4 = 7", ("7", True)),
        ("a total of 1,234.5 coins.", ("1234.5", True)),
        ("it is -12", ("-12", True)),
        ("no answer", (None, False)),
    ],
)
def test_extract_answer_or_last_number(text: str, expected: tuple[str | None, bool]) -> None:
    assert extract_answer_or_last_number(text) == expected


# ---- rewards -----------------------------------------------------------------------------------------

GOOD = (
    "<guideline><plan>1: Add directly.</plan><plan>2: Count up from 7.</plan></guideline>"
    "<step>1: 7 + 5 = 12.</step><step>2: 8, 9, 10, 11, 12.</step>"
    "<takeaway>Both give 12.</takeaway>The answer is \\boxed{12}."
)
WRONG = GOOD.replace("\\boxed{12}", "\\boxed{13}")
NO_BLOCK = "7 + 5 = 12, so \\boxed{12}."
NO_BOX = GOOD.replace("\\boxed{12}", "12")


def test_format_penalty_is_the_checkers() -> None:
    texts = [GOOD, NO_BLOCK, NO_BOX, ""]
    assert format_penalty_batch(texts) == [check(t).penalty for t in texts]
    assert format_penalty(GOOD) == 0.0
    assert -2.0 <= format_penalty(NO_BLOCK) < 0.0


def test_stage1_reward() -> None:
    assert stage1_reward("", "12") == -2.0
    assert stage1_reward("  \n", "12") == -2.0
    assert stage1_reward(GOOD, "12") == 1.0
    assert stage1_reward(WRONG, "12") == -1.0
    assert stage1_reward(NO_BLOCK, "12") == format_penalty(NO_BLOCK)  # correct, but the format costs
    assert stage1_reward(NO_BOX, "12") == format_penalty(NO_BOX) < 0.0


def test_accuracy_and_stage3_rewards_ignore_format() -> None:
    assert accuracy_reward(GOOD, "12") == stage3_reward(GOOD, "12") == 1.0
    assert accuracy_reward(NO_BLOCK, "12") == 1.0
    assert accuracy_reward(WRONG, "12") == -1.0
    assert accuracy_reward(NO_BOX, "12") == -1.0  # no \boxed{}: no answer, even if the text says 12
    assert accuracy_reward(GOOD, Example(question="7 + 5?", answer="12.0")) == 1.0


def test_batched_rewards_match_single_ones() -> None:
    texts = [GOOD, WRONG, NO_BLOCK, NO_BOX, ""]
    golds: list[str | Example] = ["12", "12", Example(question="q", answer="12"), "12", "12"]
    assert stage1_reward_batch(texts, golds) == [
        stage1_reward(t, g) for t, g in zip(texts, golds, strict=True)
    ]
    assert stage3_reward_batch(texts, golds) == [
        stage3_reward(t, g) for t, g in zip(texts, golds, strict=True)
    ]
    assert accuracy_reward_batch(texts, golds) == [1.0, -1.0, 1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        accuracy_reward_batch([GOOD, WRONG], ["12"])


def test_task_verifier_replaces_the_math_check() -> None:
    """A task's own check sees the whole response and the example, e.g. to demand the intermediate sum."""
    seen: list[Example] = []

    def shows_its_work(text: str, example: Example) -> bool:
        seen.append(example)
        return f"= {example.meta['partial']}" in text and verify(text, example.answer)

    example = Example(question="7 + 5?", answer="12", id="q1", meta={"partial": 12})
    assert accuracy_reward(GOOD, example, check=shows_its_work) == 1.0
    assert accuracy_reward(GOOD.replace("7 + 5 = 12", "7 + 5 is it"), example, check=shows_its_work) == -1.0
    assert stage1_reward_batch([GOOD, ""], [example, example], check=shows_its_work) == [1.0, -2.0]
    assert [e.id for e in seen] == ["q1", "q1", "q1"]  # the empty response was never checked
    assert stage3_reward("\\boxed{12}", "12", check=lambda text, ex: ex.answer == "12") == 1.0
