r"""The Map–Process–Reduce response grammar: the only module that knows the tag strings.

One state machine (`_Machine`) reads a response as a stream of tags and text. The batch functions
(`parse`, `check`, `canonicalize`) and the engine's incremental `StreamParser` all drive that same machine,
so the engine's fork trigger and the reward's format check can never disagree.

>>> text = "<guideline><plan>1: add 2 and 3</plan></guideline><step>1: 2 + 3 gives 5</step>"
>>> text += "<takeaway>The sum is 5.</takeaway>So \\boxed{5}"
>>> t = parse(text)
>>> [p.id for p in t.blocks[0].plans], t.answer
(['1'], '5')
>>> check(text).penalty
0.0
>>> check("no tags at all, \\boxed{5}").issues[0].code
'no_block'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

TAGS: tuple[str, ...] = (
    "<guideline>",
    "</guideline>",
    "<plan>",
    "</plan>",
    "<step>",
    "</step>",
    "<takeaway>",
    "</takeaway>",
)
GUIDELINE, GUIDELINE_END, PLAN, PLAN_END, STEP, STEP_END, TAKEAWAY, TAKEAWAY_END = TAGS
MAX_PLANS = 5

_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")
_ID_PREFIX = re.compile(r"\s*([0-9]+(?:\.[0-9]+)*)\s*:")
_BOXED = "\\boxed{"

# Penalty per issue code (DESIGN §2). Codes marked "ours" cover cases the design leaves open.
PENALTIES: dict[str, float] = {
    "empty": -2.0,
    "no_block": -1.5,
    "tag_between_blocks": -1.5,
    "no_plan": -1.0,
    "step_count": -1.0,
    "tag_in_final": -1.0,
    "no_boxed": -1.0,
    "text_in_guideline": -0.4,
    "short_plan": -0.4,
    "short_step": -0.4,
    "short_takeaway": -0.4,
    "stray_text": -0.2,
    "too_many_plans": -1.0,  # ours: grammar allows 1..max_plans
    "nested_tag": -1.0,  # ours: a tag inside plan/step/takeaway text or out of place in a block
    "unclosed": -1.0,  # ours: the response ends inside a block
    "missing_id": -0.4,  # ours: plan/step text does not start with "ID:"
    "step_id_mismatch": -0.4,  # ours: step i does not carry plan i's ID
    "duplicate_id": -0.4,  # ours: two plans of one guideline share an ID (a branch could not be named)
}
# Issues that are about quality, not grammar: `parse` accepts them, `check` still penalises them.
QUALITY_CODES = frozenset({"short_plan", "short_step", "short_takeaway"})
MIN_CHARS = {"plan": 3, "step": 6, "takeaway": 6}


@dataclass(frozen=True)
class TagIds:
    """Token ids of the 8 tag tokens (each tag is one special token)."""

    guideline_open: int
    guideline_close: int
    plan_open: int
    plan_close: int
    step_open: int
    step_close: int
    takeaway_open: int
    takeaway_close: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TagIds:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in TAGS]
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(TAGS, ids, strict=True) if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"tokenizer lacks tag tokens {missing}; call npr.model.add_tag_tokens first")
        return cls(*ids)

    def as_tuple(self) -> tuple[int, ...]:
        return (
            self.guideline_open,
            self.guideline_close,
            self.plan_open,
            self.plan_close,
            self.step_open,
            self.step_close,
            self.takeaway_open,
            self.takeaway_close,
        )

    def tag_of(self, token_id: int) -> str | None:
        """The tag string of a token id, or None for ordinary tokens."""
        for tag, tid in zip(TAGS, self.as_tuple(), strict=True):
            if tid == token_id:
                return tag
        return None


# ----------------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class Item:
    """One plan or step: its ID and its trimmed text (without the "ID:" prefix)."""

    id: str
    text: str


@dataclass(frozen=True)
class Block:
    plans: tuple[Item, ...]
    steps: tuple[Item, ...]
    takeaway: str


@dataclass(frozen=True)
class Trajectory:
    blocks: tuple[Block, ...]
    final: str

    @property
    def answer(self) -> str | None:
        return _last_boxed(self.final)


@dataclass(frozen=True)
class Issue:
    code: str
    message: str
    offset: int

    @property
    def penalty(self) -> float:
        return PENALTIES[self.code]


@dataclass(frozen=True)
class FormatReport:
    issues: tuple[Issue, ...]
    penalty: float

    @property
    def ok(self) -> bool:
        return not self.issues


class FormatError(ValueError):
    """A response that breaks the grammar; `code` is an issue code, `offset` a character index."""

    def __init__(self, code: str, message: str, offset: int):
        super().__init__(f"{code} at char {offset}: {message}")
        self.code, self.message, self.offset = code, message, offset


class EventKind(StrEnum):
    GUIDELINE_CLOSED = "guideline_closed"
    STEP_CLOSED = "step_closed"
    TAKEAWAY_OPENED = "takeaway_opened"
    TAKEAWAY_CLOSED = "takeaway_closed"
    VIOLATION = "violation"


@dataclass(frozen=True)
class Event:
    """What the stream parser saw: a structural milestone, or a violation with its issue code."""

    kind: EventKind
    offset: int
    plan_ids: tuple[str, ...] = ()
    step_id: str | None = None
    code: str | None = None
    message: str | None = None


# ----------------------------------------------------------------------------------------------------------
# The state machine


def _split_item(text: str, kind: str, offset: int, issues: list[Issue]) -> Item:
    """Split "ID: text" into an Item, recording missing-ID and too-short issues."""
    m = _ID_PREFIX.match(text)
    if m is None:
        issues.append(Issue("missing_id", f"{kind} text must start with 'ID:', got {text[:20]!r}", offset))
        item = Item("", text.strip())
    else:
        item = Item(m.group(1), text[m.end() :].strip())
    _check_length(item.text, kind, offset, issues)
    return item


def _check_length(text: str, kind: str, offset: int, issues: list[Issue]) -> None:
    n = len("".join(text.split()))
    if n < MIN_CHARS[kind]:
        issues.append(
            Issue(f"short_{kind}", f"{kind} has {n} non-space chars, needs {MIN_CHARS[kind]}", offset)
        )


@dataclass
class _Machine:
    """Reads (tag | text) pieces in order; collects blocks, issues and engine events."""

    max_plans: int = MAX_PLANS
    state: Literal["outside", "guideline", "plan", "steps", "step", "takeaway"] = "outside"
    blocks: list[Block] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    # The block being read.
    plans: list[Item] = field(default_factory=list)
    steps: list[Item] = field(default_factory=list)
    text: str = ""  # text of the open plan/step/takeaway
    text_offset: int = 0
    guideline_text_flagged: bool = False
    block_issues: int = 0  # index in `issues` where the open block's own issues start
    # Text after a </plan> in a guideline: stray if another <plan> follows, text_in_guideline otherwise.
    guideline_gap: int | None = None
    # Pieces seen outside any block since the last complete block: their meaning is known only later
    # (stray text before a new block, or the final text when the response ends).
    outside_text: list[tuple[str, int]] = field(default_factory=list)
    outside_tags: list[tuple[str, int]] = field(default_factory=list)

    def feed(self, tag: str | None, text: str, offset: int) -> list[Event]:
        if tag is None:
            self._text(text, offset)
            return []
        return self._tag(tag, offset)

    def _text(self, text: str, offset: int) -> None:
        if self.state in ("plan", "step", "takeaway"):
            if not self.text:
                self.text_offset = offset
            self.text += text
        elif self.state == "outside":
            self.outside_text.append((text, offset))
        elif text.strip():
            if self.state == "guideline" and self.plans:
                if self.guideline_gap is None:
                    self.guideline_gap = offset
            elif self.state == "guideline":
                self._flag_guideline_text(offset)
            elif self.state == "steps":
                self.issues.append(Issue("stray_text", "text between steps", offset))

    def _flag_guideline_text(self, offset: int) -> None:
        if not self.guideline_text_flagged:
            self.guideline_text_flagged = True
            self.issues.append(Issue("text_in_guideline", "text outside <plan> in a guideline", offset))

    def _violation(self, code: str, message: str, offset: int) -> Event:
        self.issues.append(Issue(code, message, offset))
        return Event(EventKind.VIOLATION, offset, code=code, message=message)

    def _break_block(self, tag: str, offset: int) -> list[Event]:
        """A tag that cannot stand here ends the block as broken; the tag is then read from outside."""
        event = self._violation("nested_tag", f"{tag} inside <{self.state}>", offset)
        self._reset_block()
        self.state = "outside"
        return [event, *self._tag(tag, offset)]

    def _reset_block(self) -> None:
        self.plans, self.steps, self.text, self.guideline_text_flagged = [], [], "", False
        self.guideline_gap = None

    def _tag(self, tag: str, offset: int) -> list[Event]:
        s = self.state
        if s == "outside":
            if tag == GUIDELINE:
                self._open_block(offset)
                self.state = "guideline"
                return []
            self.outside_tags.append((tag, offset))
            return [
                Event(EventKind.VIOLATION, offset, code="unexpected_tag", message=f"{tag} outside a block")
            ]
        if s == "guideline":
            if tag == PLAN:
                if self.guideline_gap is not None:
                    self.issues.append(Issue("stray_text", "text between plans", self.guideline_gap))
                    self.guideline_gap = None
                self.state, self.text, self.text_offset = "plan", "", offset + len(tag)
                return []
            if tag == GUIDELINE_END:
                if self.guideline_gap is not None:
                    self._flag_guideline_text(self.guideline_gap)
                return self._close_guideline(offset)
        elif s == "plan" and tag == PLAN_END:
            plan = _split_item(self.text, "plan", self.text_offset, self.issues)
            if plan.id and plan.id in {p.id for p in self.plans}:
                self.issues.append(Issue("duplicate_id", f"plan ID {plan.id} repeats", self.text_offset))
            self.plans.append(plan)
            self.state = "guideline"
            return []
        elif s == "steps":
            if tag == STEP:
                self.state, self.text, self.text_offset = "step", "", offset + len(tag)
                return []
            if tag == TAKEAWAY:
                return self._open_takeaway(offset)
        elif s == "step" and tag == STEP_END:
            step = _split_item(self.text, "step", self.text_offset, self.issues)
            self.steps.append(step)
            self.state = "steps"
            return [Event(EventKind.STEP_CLOSED, offset, step_id=step.id)]
        elif s == "takeaway" and tag == TAKEAWAY_END:
            _check_length(self.text, "takeaway", self.text_offset, self.issues)
            self.blocks.append(Block(tuple(self.plans), tuple(self.steps), self.text.strip()))
            self._reset_block()
            self.state = "outside"
            return [Event(EventKind.TAKEAWAY_CLOSED, offset)]
        return self._break_block(tag, offset)

    def _open_block(self, offset: int) -> None:
        """Whatever stood outside since the last block was between blocks, not final text."""
        for text, at in self.outside_text:
            if text.strip():
                self.issues.append(Issue("stray_text", "text outside tags between blocks", at))
                break
        for tag, at in self.outside_tags[:1]:
            self.issues.append(Issue("tag_between_blocks", f"{tag} between blocks", at))
        self.outside_text, self.outside_tags = [], []
        self._reset_block()
        self.block_issues = len(self.issues)

    def _close_guideline(self, offset: int) -> list[Event]:
        self.state = "steps"
        if not self.plans:
            return [self._violation("no_plan", "guideline has no <plan>", offset)]
        if len(self.plans) > self.max_plans:
            msg = f"{len(self.plans)} plans, at most {self.max_plans} allowed"
            return [self._violation("too_many_plans", msg, offset)]
        # Fork only on a guideline that `parse` accepts: the trigger and the checker agree (DESIGN §3).
        broken = [i for i in self.issues[self.block_issues :] if i.code not in QUALITY_CODES]
        if broken:
            first = broken[0]
            return [Event(EventKind.VIOLATION, offset, code=first.code, message=first.message)]
        return [Event(EventKind.GUIDELINE_CLOSED, offset, plan_ids=tuple(p.id for p in self.plans))]

    def _open_takeaway(self, offset: int) -> list[Event]:
        self.state, self.text, self.text_offset = "takeaway", "", offset + len(TAKEAWAY)
        events = [Event(EventKind.TAKEAWAY_OPENED, offset)]
        if len(self.steps) != len(self.plans):
            msg = f"{len(self.steps)} steps for {len(self.plans)} plans"
            events.append(self._violation("step_count", msg, offset))
        elif any(p.id != s.id for p, s in zip(self.plans, self.steps, strict=True)):
            msg = f"step IDs {[s.id for s in self.steps]} do not match plan IDs {[p.id for p in self.plans]}"
            events.append(self._violation("step_id_mismatch", msg, offset))
        return events

    def finish(self, end: int) -> str:
        """End of the response: classify what stood outside as final text; return that text."""
        if self.state != "outside":
            self.issues.append(Issue("unclosed", f"response ends inside <{self.state}>", end))
        final = "".join(t for t, _ in self.outside_text) if self.state == "outside" else ""
        at = self.outside_text[0][1] if self.outside_text else end
        if not self.blocks:
            # At the end, not at 0: parse then reports the cause (a nested tag, an unclosed block) first.
            self.issues.append(Issue("no_block", "no complete <guideline>…</takeaway> block", end))
        if self.outside_tags:
            tag, tag_at = self.outside_tags[0]
            self.issues.append(Issue("tag_in_final", f"{tag} in the final text", tag_at))
        if not _last_boxed(final):
            self.issues.append(Issue("no_boxed", "final text has no non-empty \\boxed{…}", at))
        return final.strip()


def _pieces(text: str) -> Iterator[tuple[str | None, str, int]]:
    """Split text into (tag, text, offset) pieces; tag is None for plain text."""
    offset = 0
    for part in _TAG_SPLIT.split(text):
        if part:
            yield (part if part in TAGS else None), part, offset
            offset += len(part)


def _run(text: str, max_plans: int) -> tuple[_Machine, str]:
    machine = _Machine(max_plans=max_plans)
    for tag, part, offset in _pieces(text):
        machine.feed(tag, part, offset)
    final = machine.finish(len(text))
    machine.issues.sort(key=lambda i: i.offset)
    return machine, final


# ----------------------------------------------------------------------------------------------------------
# Batch API


def check(text: str, *, max_plans: int = MAX_PLANS) -> FormatReport:
    """Validate a response; never raises. Penalty graded as DESIGN §2, clamped to [-2, 0]."""
    if not text.strip():
        return FormatReport((Issue("empty", "empty response", 0),), PENALTIES["empty"])
    machine, _ = _run(text, max_plans)
    penalty = max(-2.0, sum((i.penalty for i in machine.issues), 0.0))
    return FormatReport(tuple(machine.issues), penalty)


def parse(text: str, *, max_plans: int = MAX_PLANS) -> Trajectory:
    """Parse a response into blocks and final text; raise FormatError at the first grammar issue."""
    if not text.strip():
        raise FormatError("empty", "empty response", 0)
    machine, final = _run(text, max_plans)
    for issue in machine.issues:
        if issue.code not in QUALITY_CODES:
            raise FormatError(issue.code, issue.message, issue.offset)
    return Trajectory(tuple(machine.blocks), final)


def _render_item(tag_open: str, tag_close: str, item: Item) -> str:
    return f"{tag_open}{item.id}: {item.text}{tag_close}"


def render(trajectory: Trajectory) -> str:
    """Canonical text: no whitespace between consecutive tags, trimmed texts."""
    out = []
    for b in trajectory.blocks:
        out.append(GUIDELINE + "".join(_render_item(PLAN, PLAN_END, p) for p in b.plans) + GUIDELINE_END)
        out.append("".join(_render_item(STEP, STEP_END, s) for s in b.steps))
        out.append(f"{TAKEAWAY}{b.takeaway}{TAKEAWAY_END}")
    out.append(trajectory.final)
    return "".join(out)


def canonicalize(text: str) -> str:
    """`render(parse(text))`: the form SFT data are tokenised in."""
    return render(parse(text))


def contains_tag(text: str) -> bool:
    """Whether any tag string occurs in text (used to keep tags out of prompts)."""
    return _TAG_SPLIT.search(text) is not None


def _last_boxed(text: str) -> str | None:
    """Content of the last balanced, non-empty \\boxed{…} in text."""
    start = text.rfind(_BOXED)
    while start != -1:
        end = _closing_brace(text, start + len(_BOXED))
        if end is not None:
            content = text[start + len(_BOXED) : end - 1].strip()
            if content:
                return content
        start = text.rfind(_BOXED, 0, start)
    return None


def _closing_brace(text: str, start: int) -> int | None:
    """Index just past the brace that closes the group opened right before `start`; None if unbalanced."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return i if depth == 0 else None


def boxed_answers(text: str) -> list[str]:
    r"""Contents of every balanced, non-empty `\boxed{…}` of text, in order (a list answer may box each item).

    >>> boxed_answers(r"x = \boxed{1} or \boxed{-2}, not \boxed{}")
    ['1', '-2']
    """
    out, start = [], text.find(_BOXED)
    while start != -1:
        end = _closing_brace(text, start + len(_BOXED))
        content = text[start + len(_BOXED) : end - 1].strip() if end is not None else ""
        if content:
            out.append(content)
        start = text.find(_BOXED, start + 1)
    return out


def final_text(text: str) -> str:
    """The text after the last </takeaway> (the whole text when there is none)."""
    cut = text.rfind(TAKEAWAY_END)
    return text if cut == -1 else text[cut + len(TAKEAWAY_END) :]


def extract_answer(text: str) -> str | None:
    r"""Content of the last balanced `\boxed{…}` of the final text; nested braces are kept.

    >>> extract_answer(r"<takeaway>x \boxed{1}</takeaway> so \boxed{\frac{1}{2}}")
    '\\frac{1}{2}'
    """
    return _last_boxed(final_text(text))


# ----------------------------------------------------------------------------------------------------------
# Incremental parser for the engine


class StreamParser:
    """Feed decoded text piece by piece; get structural events as soon as a tag completes.

    `start="response"` reads a whole response (the trunk); `start="step"` reads one parallel branch that
    begins just after its forced `<step>`: it reports `step_closed` at `</step>` and a violation for any
    other tag. Tags split across pieces are held back until complete.

    >>> p = StreamParser()
    >>> [e.kind.value for e in p.feed("<guideline><plan>1: a</plan><plan>2: b</pl")]
    []
    >>> [(e.kind.value, e.plan_ids) for e in p.feed("an></guideline>")]
    [('guideline_closed', ('1', '2'))]
    """

    def __init__(self, *, max_plans: int = MAX_PLANS, start: Literal["response", "step"] = "response"):
        self._machine = _Machine(max_plans=max_plans)
        if start == "step":
            self._machine.state = "step"
        self._pending = ""
        self._offset = 0

    @property
    def state(self) -> str:
        return self._machine.state

    def feed(self, piece: str) -> list[Event]:
        text = self._pending + piece
        # Hold back a trailing "<…" that could still grow into a tag.
        hold = text.rfind("<")
        if hold != -1 and any(t.startswith(text[hold:]) and t != text[hold:] for t in TAGS):
            text, self._pending = text[:hold], text[hold:]
        else:
            self._pending = ""
        events: list[Event] = []
        for tag, part, offset in _pieces(text):
            events += self._machine.feed(tag, part, self._offset + offset)
        self._offset += len(text)
        return events

    def feed_all(self, pieces: Iterable[str]) -> list[Event]:
        return [e for p in pieces for e in self.feed(p)]

    def feed_token(self, piece: str, tag: str | None) -> list[Event]:
        """Feed one decoded token whose tag-ness is known from its id: `tag` for a tag token, else None.

        A tag spelled out in ordinary sub-tokens is then plain text, which keeps the engine's structure
        a function of token ids, as the layout is (DESIGN §3).

        >>> p = StreamParser()
        >>> p.feed_token("<guideline>", None), p.state
        ([], 'outside')
        """
        if self._pending:  # text held back by `feed` is plain text after all
            piece, self._pending = self._pending + piece, ""
        at = self._offset
        self._offset += len(piece)
        return self._machine.feed(tag, piece, at)
