r"""`group_max`: groups of single-digit numbers (3–5 groups of five by default; the demo uses five groups of
six); the answer is the largest group sum. It is the demo's task because it decomposes cleanly — one plan
per group, one step per running-sum chain, and a short takeaway naming the group with the maximum. By
tokens of the demo tokenizer a parallel answer's critical path is 1.97× shorter than the sequential
solution at the defaults and 2.44× at five groups of six (sub-tasks longer than the plans and the merge).

On such a task chance is high (the most frequent answer alone is right ~10%), so the verifier checks every
intermediate result, not only the final answer: every `a+b=c` must be right, every group total `L=S` must
be stated and right, the last decision `max L=S` must name a group with the largest sum, and a formatted
answer must give each group its own step.

>>> ex = make_group_max(1, seed=0)[0]
>>> check_group_max(sequential_solution(ex), ex), check_group_max(parallel_solution(ex), ex)
(True, True)
>>> check_group_max(sequential_solution(ex).replace("=", "=1", 1), ex)
False
"""

from __future__ import annotations

import random
import re

from npr.example import Example
from npr.format import Block, FormatError, Item, Trajectory, extract_answer, parse, render

LABELS = "ABCDE"
_EQUATION = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)")
_TOTAL = re.compile(rf"\b([{LABELS}])\s*=\s*(\d+)")
_DECISION = re.compile(rf"\bmax\s+([{LABELS}])\s*=\s*(\d+)")


def _groups(ex: Example) -> list[list[int]]:
    return ex.meta["groups"]


def _question(groups: list[list[int]]) -> str:
    parts = "; ".join(f"{LABELS[i]}: {' '.join(map(str, g))}" for i, g in enumerate(groups))
    return f"Which group has the largest sum? {parts}."


def make_group_max(
    n: int,
    seed: int = 0,
    *,
    min_groups: int = 3,
    max_groups: int = 5,
    group_size: int = 5,
    min_number: int = 1,
    max_number: int = 9,
) -> list[Example]:
    """n problems, reproducible from the seed; every number is a digit in [min_number, max_number]."""
    if not 1 <= min_groups <= max_groups <= len(LABELS):
        raise ValueError(
            f"need 1 <= min_groups <= max_groups <= {len(LABELS)}, got {min_groups}, {max_groups}"
        )
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a chain adds two numbers at least), got {group_size}")
    if not 0 <= min_number <= max_number <= 9:
        raise ValueError(f"need 0 <= min_number <= max_number <= 9 (digits), got {min_number}, {max_number}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        groups = [
            [rng.randint(min_number, max_number) for _ in range(group_size)]
            for _ in range(rng.randint(min_groups, max_groups))
        ]
        answer = str(max(map(sum, groups)))
        meta = {"task": "group_max", "groups": groups}
        out.append(Example(_question(groups), answer, f"group_max-{seed}-{i}", meta))
    return out


def _chain(label: str, numbers: list[int]) -> str:
    """Running-sum chain that names its group first, e.g. "A: 3+1=4 4+4=8 8+1=9 9+5=14 so A=14".

    The leading label matters in a parallel step: the branch cannot see its siblings, so the label is
    what tells it which group of the question to copy, as it does in the sequential solution.
    """
    total, eqs = numbers[0], []
    for x in numbers[1:]:
        eqs.append(f"{total}+{x}={total + x}")
        total += x
    return f"{label}: {' '.join(eqs)} so {label}={total}"


def _decision(groups: list[list[int]]) -> str:
    """The group with the largest sum and that sum, e.g. "max C=30" (the first such group on a tie).

    It does not restate every total: that would add three tokens per group to the merge, which every
    parallel answer pays on its critical path (the totals already end each step).
    """
    sums = [sum(g) for g in groups]
    return f"max {LABELS[sums.index(max(sums))]}={max(sums)}"


def sequential_solution(ex: Example, rng: random.Random | None = None) -> str:
    """The plain worked solution the seed model learns from; with `rng`, the groups in a random order.

    Random orders teach the seed to find a group in the question by its label rather than by where the
    line stands, which is what a parallel step (all branches start at the same position) needs.
    """
    groups = _groups(ex)
    order = list(range(len(groups)))
    if rng is not None:
        rng.shuffle(order)
    lines = [f"{_chain(LABELS[i], groups[i])}." for i in order]
    return " ".join(lines) + f" {_decision(groups)} \\boxed{{{ex.answer}}}"


def parallel_solution(ex: Example) -> str:
    """A clean parallel trace (used by tests and for reference; never in the seed's data)."""
    groups = _groups(ex)
    plans = tuple(Item(str(i + 1), f"sum {LABELS[i]}") for i in range(len(groups)))
    steps = tuple(Item(str(i + 1), _chain(LABELS[i], g)) for i, g in enumerate(groups))
    return render(Trajectory((Block(plans, steps, _decision(groups)),), f"\\boxed{{{ex.answer}}}"))


NOISE = {"merged_plan": 0.15, "lumped_steps": 0.15, "unclosed_step": 0.1, "no_takeaway": 0.2}
"""Chance of each independent structural flaw of a noisy attempt (`unclosed_step` is drawn per step)."""
SMALL_FLAWS = ("stray_text", "missing_id")
"""A flaw one of which every attempt with a right structure gets: " then " between two steps, or a step
without its "ID:" (format penalties -0.2 and -0.8, milder than any structural flaw)."""


def noisy_attempt(ex: Example, rng: random.Random) -> str:
    """A format attempt with the right content and at least one flaw (seed data: never a clean trace).

    Each structural flaw is drawn on its own (one merged plan, or all chains lumped into one step; each
    step left unclosed; no takeaway); an attempt that drew none gets one small flaw at a random step.
    Independent flaws matter: a seed that learned whole fixed kinds of broken trace never samples a clean
    one, so format RL has nothing to reinforce. Small flaws matter too: under the graded penalty an
    attempt with the right structure then scores above a merged plan, so RL moves towards the structure.
    """
    groups = _groups(ex)
    chains = [_chain(LABELS[i], g) for i, g in enumerate(groups)]
    flaw = {name: rng.random() < p for name, p in NOISE.items() if name != "unclosed_step"}
    flaw["lumped_steps"] &= not flaw["merged_plan"]  # both at once would be a legal one-plan trace
    steps = [" ".join(chains)] if flaw["lumped_steps"] else chains
    unclosed = [rng.random() < NOISE["unclosed_step"] for _ in steps]
    small: str | None = rng.choice(SMALL_FLAWS)
    at = rng.randrange(len(steps))
    if any(flaw.values()) or any(unclosed):
        small = None
    elif small == "stray_text" and len(steps) > 1:
        at = rng.randrange(1, len(steps))  # text between two steps
    names = ["all"] if flaw["merged_plan"] else list(LABELS[: len(groups)])
    plans = "".join(f"<plan>{i + 1}: sum {name}</plan>" for i, name in enumerate(names))
    body = ""
    for i, (text, cut) in enumerate(zip(steps, unclosed, strict=True)):
        if i == at and small == "stray_text":
            body += " then "
        step_id = "" if i == at and small == "missing_id" else f"{i + 1}: "
        body += f"<step>{step_id}{text}{'' if cut else '</step>'}"
    takeaway = "" if flaw["no_takeaway"] else f"<takeaway>{_decision(groups)}</takeaway>"
    return f"<guideline>{plans}</guideline>{body}{takeaway}\\boxed{{{ex.answer}}}"


def check_group_max(text: str, ex: Example) -> bool:
    """Correct answer AND every intermediate result right AND (if formatted) one step per group.

    Every `L=S` must be right and every group's total stated; the last decision `max L=S` must name a
    group with the largest sum. The keyword counts: a reward blind to it lets RL drift to other words
    there (measured: PAPO turned `max` into `ax` in 8 steps, and the labels after it got worse).
    """
    groups = _groups(ex)
    if (extract_answer(text) or "").strip() != ex.answer:
        return False
    if any(int(a) + int(b) != int(c) for a, b, c in _EQUATION.findall(text)):
        return False
    sums = {LABELS[i]: sum(g) for i, g in enumerate(groups)}
    totals = [(label, int(value)) for label, value in _TOTAL.findall(text)]
    stated = {label for label, _ in totals}
    if stated != set(sums) or any(sums[label] != value for label, value in totals):
        return False
    decisions = _DECISION.findall(text)
    if not decisions or int(decisions[-1][1]) != max(sums.values()):
        return False
    try:
        trajectory = parse(text)
    except FormatError:
        return True  # unformatted (sequential) answers are judged on content alone
    steps = [s for b in trajectory.blocks for s in b.steps]
    return len(steps) == len(groups) and all(
        f"{LABELS[i]}={sum(g)}" in s.text.replace(" ", "")
        for i, (g, s) in enumerate(zip(groups, steps, strict=True))
    )
