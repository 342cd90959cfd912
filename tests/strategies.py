"""Shared hypothesis strategies: random valid trajectories (text) and random valid token-id sequences.

The token sequences come with the spans of their parts (plans, branches, takeaway) so that tests can state
the layout rules of DESIGN §3 directly, and mutate a sequence at a known index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from npr.format import (
    GUIDELINE,
    GUIDELINE_END,
    MAX_PLANS,
    PLAN,
    PLAN_END,
    STEP,
    STEP_END,
    TAGS,
    TAKEAWAY,
    TAKEAWAY_END,
    Block,
    Item,
    TagIds,
    Trajectory,
    contains_tag,
)

# FAST for the core properties; FEWER for narrow mutations (each one edits a single spot of a valid case).
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(FAST, max_examples=40)

# ----------------------------------------------------------------------------------------------------------
# Text

# Words drawn from a fixed vocabulary keep generation cheap; it holds the awkward cases: tag fragments that
# are not tags, colons and leading digits (an ID-like start of a text), braces, non-ASCII. No backslash, so no
# stray "\\boxed{" appears by chance. An empty separator glues words ("<" + "plan>" makes a tag: filtered).
_WORDS = (
    "a",
    "x1",
    "2:",
    "3.4:",
    "<",
    ">",
    "</",
    "<pla",
    "plan>",
    "</ste",
    "{",
    "}",
    "a{b}",
    "é",
    "λ",
    "中文",
)
_LONG_WORDS = ("compute", "reason", "because", "therefore", "abcdef", "42 = 6*7", "x<y>z", "12: sum")
_SEPS = ("", " ", "\n", "  ", " \t")
WHITESPACE = ("", " ", "\n", "\t ", " \n  ")
_WS = st.sampled_from(WHITESPACE)
_GLUED_WORDS = st.sampled_from([s + w for s in _SEPS for w in _WORDS + _LONG_WORDS])


@cache  # building a strategy is costly (validation); draw the same objects every time
def texts(min_chars: int = 1) -> st.SearchStrategy[str]:
    """Trimmed, tag-free text with at least `min_chars` (at most 6) non-space characters."""
    first = st.sampled_from([w for w in _LONG_WORDS if len(w.replace(" ", "")) >= min_chars])
    joined = st.builds(lambda a, r: a + "".join(r), first, st.lists(_GLUED_WORDS, max_size=2))
    return joined.filter(lambda s: not contains_tag(s))


@cache
def short_texts(max_chars: int) -> st.SearchStrategy[str]:
    """Trimmed text with at most `max_chars` non-space characters (possibly empty)."""
    words = st.lists(st.sampled_from(("a", "bc", "é")), max_size=max_chars)
    return words.map(" ".join).filter(lambda s: len(s.replace(" ", "")) <= max_chars)


ITEM_IDS = st.sampled_from(("1", "2", "3", "4", "5", "0", "12", "2.1", "1.10", "3.0.7"))


def answers() -> st.SearchStrategy[str]:
    """Non-empty boxed contents, sometimes with nested braces."""
    plain = st.sampled_from(("5", "-3", "x+1", "2^{10}", "a, b", "\\pi", "1.5"))
    return st.one_of(plain, st.tuples(plain, plain).map(lambda p: f"\\frac{{{p[0]}}}{{{p[1]}}}"))


def finals() -> st.SearchStrategy[str]:
    """Trimmed final text with one non-empty `\\boxed{…}`."""
    around = st.one_of(st.just(""), texts())
    return st.builds(lambda a, ans, b: f"{a} \\boxed{{{ans}}} {b}".strip(), around, answers(), around)


@st.composite
def blocks(draw, min_plans: int = 1, max_plans: int = MAX_PLANS) -> Block:
    n = draw(st.integers(min_plans, max_plans))
    ids = draw(st.lists(ITEM_IDS, min_size=n, max_size=n, unique=True))  # repeated IDs cannot fork
    plans = tuple(Item(i, draw(texts(3))) for i in ids)
    steps = tuple(Item(i, draw(texts(6))) for i in ids)
    return Block(plans, steps, draw(texts(6)))


def trajectories(
    min_blocks: int = 1, max_blocks: int = 2, min_plans: int = 1
) -> st.SearchStrategy[Trajectory]:
    """Valid trajectories: canonical texts, 1..max_plans plans per block, a boxed answer in the final."""
    some_blocks = st.lists(blocks(min_plans=min_plans), min_size=min_blocks, max_size=max_blocks)
    return st.builds(lambda b, f: Trajectory(tuple(b), f), some_blocks, finals())


@st.composite
def noisy_renders(draw) -> tuple[Trajectory, str]:
    """A valid trajectory and a rendering of it with random whitespace between tags, around texts and IDs."""
    t = draw(trajectories())

    def ws() -> str:
        return draw(_WS)

    def item(open_tag: str, close_tag: str, it: Item) -> str:
        return f"{open_tag}{ws()}{it.id}{ws()}:{ws()}{it.text}{ws()}{close_tag}{ws()}"

    parts = [ws()]
    for b in t.blocks:
        parts += [GUIDELINE, ws(), *(item(PLAN, PLAN_END, p) for p in b.plans), GUIDELINE_END, ws()]
        parts += [item(STEP, STEP_END, s) for s in b.steps]
        parts += [TAKEAWAY, ws(), b.takeaway, ws(), TAKEAWAY_END, ws()]
    parts += [t.final, ws()]
    return t, "".join(parts)


def tag_soup() -> st.SearchStrategy[str]:
    """Arbitrary mixes of tags, plan-like text, boxed answers and random text."""
    piece = st.one_of(
        st.sampled_from(TAGS),
        st.sampled_from(
            ["1: ", "2.1: abcdef ", "\\boxed{4}", "\\boxed{", "}", " ", "\n", "<", "</ste", "<plan"]
        ),
        st.text(max_size=8),
    )
    return st.lists(piece, max_size=40).map("".join)


# ----------------------------------------------------------------------------------------------------------
# Token ids

TAG_IDS = TagIds(*range(100, 108))  # ordinary tokens are 0..99
ORDINARY = st.integers(0, 99)


@dataclass(frozen=True)
class BlockSpan:
    """Token indices of one block's parts; branches are [start, end) from <step> to </step> inclusive."""

    guideline: int
    plans: tuple[tuple[int, int], ...]
    guideline_close: int
    branches: tuple[tuple[int, int], ...]
    takeaway: int
    takeaway_close: int


@dataclass(frozen=True)
class TokenCase:
    ids: tuple[int, ...]
    prompt_len: int
    blocks: tuple[BlockSpan, ...]


@st.composite
def token_cases(draw, min_prompt: int = 0, max_blocks: int = 3) -> TokenCase:
    """prompt, then 1..max_blocks blocks (each after 0..3 trunk tokens) with 1..5 branches of unequal
    lengths, then 0..4 final tokens."""
    t = TAG_IDS
    ids: list[int] = []

    def ordinary(lo: int, hi: int) -> list[int]:
        return draw(st.lists(ORDINARY, min_size=lo, max_size=hi))

    ids += ordinary(min_prompt, min_prompt + 5)
    prompt_len = len(ids)
    spans = []
    for _ in range(draw(st.integers(1, max_blocks))):
        ids += ordinary(0, 3)
        guideline = len(ids)
        ids.append(t.guideline_open)
        n = draw(st.integers(1, MAX_PLANS))
        plans = []
        for _ in range(n):
            start = len(ids)
            ids += [t.plan_open, *ordinary(0, 3), t.plan_close]
            plans.append((start, len(ids)))
        guideline_close = len(ids)
        ids.append(t.guideline_close)
        branches = []
        for length in draw(st.lists(st.integers(0, 8), min_size=n, max_size=n, unique=True)):
            start = len(ids)
            ids += [t.step_open, *ordinary(length, length), t.step_close]
            branches.append((start, len(ids)))
        takeaway = len(ids)
        ids += [t.takeaway_open, *ordinary(0, 3)]
        takeaway_close = len(ids)
        ids.append(t.takeaway_close)
        spans.append(
            BlockSpan(guideline, tuple(plans), guideline_close, tuple(branches), takeaway, takeaway_close)
        )
    ids += ordinary(0, 4)
    return TokenCase(tuple(ids), prompt_len, tuple(spans))
