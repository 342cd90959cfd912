"""Property tests for npr.format: round trip, canonical form, graded issues (DESIGN §2), answers, stream parser.

Mutations edit a rendered valid text at a place found through the tag strings (texts never hold tags, so the
n-th occurrence of a tag is the n-th structural one) and state the exact issues and penalty they must give.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from npr.format import (
    GUIDELINE,
    GUIDELINE_END,
    PENALTIES,
    PLAN,
    PLAN_END,
    QUALITY_CODES,
    STEP,
    STEP_END,
    TAGS,
    TAKEAWAY,
    TAKEAWAY_END,
    Block,
    EventKind,
    FormatError,
    Item,
    StreamParser,
    Trajectory,
    canonicalize,
    check,
    extract_answer,
    parse,
    render,
)
from tests.strategies import (
    FAST,
    FEWER,
    WHITESPACE,
    blocks,
    noisy_renders,
    short_texts,
    tag_soup,
    texts,
    trajectories,
)

NOT_GUIDELINE = [t for t in TAGS if t != GUIDELINE]
# Issues that the stream parser reports as violation events (the rest are about text, not structure).
STRUCTURAL = {
    "nested_tag",
    "no_plan",
    "too_many_plans",
    "step_count",
    "step_id_mismatch",
    "tag_between_blocks",
    "tag_in_final",
}


def tag_at(text: str, tag: str, nth: int, *, end: bool = False) -> int:
    """Char index of the nth (0-based) occurrence of tag in text, or of the char after it."""
    at = -1
    for _ in range(nth + 1):
        at = text.index(tag, at + 1)
    return at + len(tag) if end else at


def insert(text: str, at: int, piece: str) -> str:
    return text[:at] + piece + text[at:]


def plans_before(t: Trajectory, b: int) -> int:
    """How many plans precede block b (to index tag occurrences)."""
    return sum(len(x.plans) for x in t.blocks[:b])


def replace_block(t: Trajectory, b: int, block: Block) -> Trajectory:
    return Trajectory(t.blocks[:b] + (block,) + t.blocks[b + 1 :], t.final)


def expect(text: str, codes: list[str], penalty: float, *, at: int | None = None) -> None:
    """check gives exactly `codes` and `penalty`; parse raises the first non-quality one of `codes`, at `at`."""
    report = check(text)
    assert sorted(i.code for i in report.issues) == sorted(codes), report.issues
    assert report.penalty == pytest.approx(penalty)
    grammar = [c for c in codes if c not in QUALITY_CODES]
    if not grammar:
        parse(text)
        return
    with pytest.raises(FormatError) as err:
        parse(text)
    assert err.value.code == grammar[0]
    if at is not None:
        assert err.value.offset == at, (err.value, text[at : at + 20])


# ----------------------------------------------------------------------------------------------------------
# Round trip and canonical form


@FAST
@given(trajectories())
def test_parse_inverts_render(t: Trajectory) -> None:
    text = render(t)
    assert parse(text) == t
    report = check(text)
    assert report.ok and report.penalty == 0.0
    assert t.answer is not None and extract_answer(text) == t.answer


@FAST
@given(trajectories())
def test_render_puts_no_whitespace_next_to_tags(t: Trajectory) -> None:
    text = render(t)
    for tag in TAGS:
        at = text.find(tag)
        while at != -1:
            end = at + len(tag)
            assert at == 0 or not text[at - 1].isspace()
            assert end == len(text) or not text[end].isspace()
            at = text.find(tag, end)


@FAST
@given(noisy_renders())
def test_canonicalize_strips_whitespace_and_is_idempotent(case: tuple[Trajectory, str]) -> None:
    t, noisy = case
    assert check(noisy).ok
    assert parse(noisy) == t
    canonical = canonicalize(noisy)
    assert canonical == render(parse(noisy)) == render(t)
    assert canonicalize(canonical) == canonical


def test_single_plan_block_and_dotted_ids_are_legal() -> None:
    text = "<guideline><plan>2.1: one plan</plan></guideline><step>2.1: do the thing</step>"
    text += "<takeaway>it is done</takeaway>\\boxed{x}"
    t = parse(text)
    assert t.blocks[0].plans == (Item("2.1", "one plan"),) and t.answer == "x"


# ----------------------------------------------------------------------------------------------------------
# Any text: check never raises, penalty is the clamped sum, parse agrees with check


@FAST
@given(st.one_of(st.text(), tag_soup()))
def test_check_penalty_is_clamped_sum_and_parse_agrees(text: str) -> None:
    report = check(text)
    assert -2.0 <= report.penalty <= 0.0
    assert report.ok == (report.penalty == 0.0)
    if text.strip():
        assert report.penalty == pytest.approx(max(-2.0, sum(PENALTIES[i.code] for i in report.issues)))
    assert all(0 <= i.offset <= len(text) for i in report.issues)
    grammar = [i for i in report.issues if i.code not in QUALITY_CODES]
    try:
        t = parse(text)
    except FormatError as err:
        assert grammar and (err.code, err.offset) == (grammar[0].code, grammar[0].offset)
    else:
        assert not grammar
        assert parse(render(t)) == t


def test_empty_response() -> None:
    for text in ("", "  \n\t"):
        expect(text, ["empty"], -2.0, at=0)


# ----------------------------------------------------------------------------------------------------------
# Mutation classes of DESIGN §2, each with its exact penalty


@FEWER
@given(st.lists(texts(), min_size=1, max_size=3), trajectories())
def test_no_block(words: list[str], t: Trajectory) -> None:
    text = " ".join(words) + " " + t.final
    expect(text, ["no_block"], -1.5, at=len(text))  # found missing only at the end


@FEWER
@given(trajectories(min_blocks=2, max_blocks=3), st.sampled_from(NOT_GUIDELINE), st.data())
def test_tag_between_blocks(t: Trajectory, tag: str, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 2))
    text = render(t)
    at = tag_at(text, TAKEAWAY_END, b, end=True)
    expect(insert(text, at, tag), ["tag_between_blocks"], -1.5, at=at)


@FEWER
@given(trajectories(), st.data())
def test_block_without_plans(t: Trajectory, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    text = render(replace_block(t, b, Block((), (), t.blocks[b].takeaway)))
    expect(text, ["no_plan"], -1.0, at=tag_at(text, GUIDELINE_END, b))


@FEWER
@given(trajectories(min_plans=2), st.data())
def test_steps_differ_from_plans(t: Trajectory, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    blk = t.blocks[b]
    i = data.draw(st.integers(0, len(blk.steps) - 1))
    fewer_steps = Block(blk.plans, blk.steps[:i] + blk.steps[i + 1 :], blk.takeaway)
    fewer_plans = Block(blk.plans[:i] + blk.plans[i + 1 :], blk.steps, blk.takeaway)
    more_steps = Block(blk.plans, (*blk.steps, blk.steps[i]), blk.takeaway)
    for mutated in (fewer_steps, fewer_plans, more_steps):
        text = render(replace_block(t, b, mutated))
        expect(text, ["step_count"], -1.0, at=tag_at(text, TAKEAWAY, b))


@FEWER
@given(trajectories(), st.sampled_from(NOT_GUIDELINE), st.booleans())
def test_tag_in_final(t: Trajectory, tag: str, at_end: bool) -> None:
    final = f"{t.final} {tag}" if at_end else f"{tag} {t.final}"
    text = render(Trajectory(t.blocks, final))
    expect(text, ["tag_in_final"], -1.0, at=text.rindex(tag))


@FEWER
@given(
    trajectories(),
    st.one_of(st.just(""), texts()),
    st.sampled_from(["", "\\boxed{}", "\\boxed{ }", "\\boxed{5"]),
)
def test_missing_or_empty_boxed(t: Trajectory, words: str, boxed: str) -> None:
    final = f"{words} {boxed}".strip()
    text = render(Trajectory(t.blocks, final))
    start = len(render(Trajectory(t.blocks, "")))
    expect(text, ["no_boxed"], -1.0, at=start)


@FEWER
@given(trajectories(), texts(), st.booleans(), st.data())
def test_text_in_guideline_outside_plans(t: Trajectory, words: str, first: bool, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    text = render(t)
    at = tag_at(text, GUIDELINE, b, end=True) if first else tag_at(text, GUIDELINE_END, b)
    expect(insert(text, at, words), ["text_in_guideline"], -0.4, at=at)


@FEWER
@given(trajectories(), st.sampled_from(["plan", "step", "takeaway"]), st.data())
def test_too_short_texts(t: Trajectory, kind: str, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    blk = t.blocks[b]
    limit = {"plan": 2, "step": 5, "takeaway": 5}[kind]
    if kind == "takeaway":
        mutated, count = Block(blk.plans, blk.steps, data.draw(short_texts(limit))), 1
    else:
        items = blk.plans if kind == "plan" else blk.steps
        chosen = data.draw(st.sets(st.integers(0, len(items) - 1), min_size=1))
        new = tuple(
            Item(x.id, data.draw(short_texts(limit)) if k in chosen else x.text) for k, x in enumerate(items)
        )
        mutated = (
            Block(new, blk.steps, blk.takeaway) if kind == "plan" else Block(blk.plans, new, blk.takeaway)
        )
        count = len(chosen)
    t2 = replace_block(t, b, mutated)
    text = render(t2)
    expect(text, [f"short_{kind}"] * count, -0.4 * count)
    assert parse(text) == t2  # quality issues are penalised, not rejected


@FEWER
@given(trajectories(min_plans=2), texts(), st.sampled_from(["plans", "steps"]), st.data())
def test_stray_text_between_plans_or_steps(
    t: Trajectory, words: str, where: str, data: st.DataObject
) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    n_before = plans_before(t, b)
    i = data.draw(st.integers(0, len(t.blocks[b].plans) - 2))
    text = render(t)
    tag = PLAN_END if where == "plans" else STEP_END
    at = tag_at(text, tag, n_before + i, end=True)
    expect(insert(text, at, words), ["stray_text"], -0.2, at=at)


@FEWER
@given(trajectories(), texts(), st.sampled_from(["after_guideline", "before_takeaway", "between_blocks"]))
def test_stray_text_around_steps_and_blocks(t: Trajectory, words: str, where: str) -> None:
    assume(where != "between_blocks" or len(t.blocks) > 1)
    text = render(t)
    at = {
        "after_guideline": lambda: tag_at(text, GUIDELINE_END, 0, end=True),
        "before_takeaway": lambda: tag_at(text, TAKEAWAY, 0),
        "between_blocks": lambda: tag_at(text, TAKEAWAY_END, 0, end=True),
    }[where]()
    expect(insert(text, at, words), ["stray_text"], -0.2, at=at)


def test_whitespace_only_between_parts_is_not_stray() -> None:
    for ws in WHITESPACE:
        text = f"{ws}<guideline>{ws}<plan>1: abc</plan>{ws}<plan>2: def</plan>{ws}</guideline>{ws}"
        text += f"<step>1: abcdef</step>{ws}<step>2: ghijkl</step>{ws}<takeaway>both fine</takeaway>{ws}\\boxed{{1}}"
        assert check(text).ok


# ----------------------------------------------------------------------------------------------------------
# The module's own codes


@FEWER
@given(blk=blocks(min_plans=5), item_text=texts(6))
def test_too_many_plans(blk: Block, item_text: str) -> None:
    extra = Item("9", item_text)
    t = Trajectory((Block((*blk.plans, extra), (*blk.steps, extra), blk.takeaway),), "\\boxed{1}")
    text = render(t)
    expect(text, ["too_many_plans"], -1.0, at=tag_at(text, GUIDELINE_END, 0))
    assert check(text, max_plans=6).ok and parse(text, max_plans=6) == t


@FEWER
@given(trajectories(), st.sampled_from(TAGS), st.sampled_from(["plan", "step", "takeaway"]), st.data())
def test_tag_inside_text_is_nested(t: Trajectory, tag: str, kind: str, data: st.DataObject) -> None:
    assume(tag != {"plan": PLAN_END, "step": STEP_END, "takeaway": TAKEAWAY_END}[kind])  # that one closes it
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    blk = t.blocks[b]
    n_before = plans_before(t, b)
    text = render(t)
    if kind == "takeaway":
        start, body = tag_at(text, TAKEAWAY, b, end=True), blk.takeaway
    else:
        i = data.draw(st.integers(0, len(blk.plans) - 1))
        item = (blk.plans if kind == "plan" else blk.steps)[i]
        open_tag = PLAN if kind == "plan" else STEP
        start = tag_at(text, open_tag, n_before + i, end=True) + len(item.id) + 2
        body = item.text
    at = start + data.draw(st.integers(0, len(body)))
    assert text[start : start + len(body)] == body
    mutated = insert(text, at, tag)
    report = check(mutated)
    assert "nested_tag" in {i.code for i in report.issues}
    assert report.penalty == pytest.approx(max(-2.0, sum(PENALTIES[i.code] for i in report.issues)))
    with pytest.raises(FormatError) as err:
        parse(mutated)
    assert (err.value.code, err.value.offset) == ("nested_tag", at)


@FEWER
@given(trajectories(), st.data())
def test_response_cut_inside_a_block_is_unclosed(t: Trajectory, data: st.DataObject) -> None:
    text = render(t)
    last = len(t.blocks) - 1
    lo = tag_at(text, GUIDELINE, last, end=True)
    hi = tag_at(text, TAKEAWAY_END, last)
    cuts = [end for tag in TAGS for end in _tag_ends(text, tag) if lo <= end <= hi]
    cut = data.draw(st.sampled_from(sorted(cuts)))
    codes = ["unclosed", "no_boxed"] + (["no_block"] if last == 0 else [])
    expect(text[:cut], codes, -2.0, at=cut)


def _tag_ends(text: str, tag: str) -> list[int]:
    ends, at = [], text.find(tag)
    while at != -1:
        ends.append(at + len(tag))
        at = text.find(tag, at + 1)
    return ends


@FEWER
@given(trajectories(), st.data())
def test_missing_ids(t: Trajectory, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    blk = t.blocks[b]
    n_before = plans_before(t, b)
    i = data.draw(st.integers(0, len(blk.plans) - 1))
    assume(not blk.plans[i].text[0].isdigit() and not blk.steps[i].text[0].isdigit())
    text = render(t)
    prefix = len(blk.plans[i].id) + 2
    plan_at = tag_at(text, PLAN, n_before + i, end=True)
    step_at = tag_at(text, STEP, n_before + i, end=True)
    step_only = text[:step_at] + text[step_at + prefix :]
    expect(step_only, ["missing_id", "step_id_mismatch"], -0.8, at=step_at)
    both = step_only[:plan_at] + step_only[plan_at + prefix :]
    expect(both, ["missing_id", "missing_id"], -0.8, at=plan_at)


@FEWER
@given(trajectories(), st.data())
def test_step_ids_must_match_plan_ids(t: Trajectory, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(t.blocks) - 1))
    blk = t.blocks[b]
    i = data.draw(st.integers(0, len(blk.steps) - 1))
    steps = list(blk.steps)
    steps[i] = Item(steps[i].id + ".7", steps[i].text)
    text = render(replace_block(t, b, Block(blk.plans, tuple(steps), blk.takeaway)))
    expect(text, ["step_id_mismatch"], -0.4, at=tag_at(text, TAKEAWAY, b))


# ----------------------------------------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{42}", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{1} and an unbalanced \\boxed{2", "1"),
        ("\\boxed{ 7 } and an empty \\boxed{}", "7"),
        ("\\boxed{3}} extra closing brace", "3"),
        ("<takeaway>\\boxed{1}</takeaway> final \\boxed{2}", "2"),
        ("<takeaway>\\boxed{1}</takeaway> no answer in the final", None),
        ("unbalanced only \\boxed{2", None),
        ("nothing boxed", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


# ----------------------------------------------------------------------------------------------------------
# StreamParser


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


any_text = st.one_of(trajectories().map(render), noisy_renders().map(lambda c: c[1]), tag_soup())


@FAST
@given(any_text, st.data())
def test_stream_events_do_not_depend_on_split(text: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    whole = StreamParser().feed(text)
    pieces = StreamParser().feed_all(split_at(text, cuts))
    chars = StreamParser().feed_all(list(text))
    assert pieces == whole == chars


@FAST
@given(trajectories())
def test_stream_events_of_a_valid_text(t: Trajectory) -> None:
    text = render(t)
    events = StreamParser().feed(text)
    want: list[tuple[EventKind, tuple[str, ...], str | None]] = []
    for b in t.blocks:
        want.append((EventKind.GUIDELINE_CLOSED, tuple(p.id for p in b.plans), None))
        want += [(EventKind.STEP_CLOSED, (), s.id) for s in b.steps]
        want += [(EventKind.TAKEAWAY_OPENED, (), None), (EventKind.TAKEAWAY_CLOSED, (), None)]
    assert [(e.kind, e.plan_ids, e.step_id) for e in events] == want
    tag_of = {
        EventKind.GUIDELINE_CLOSED: GUIDELINE_END,
        EventKind.STEP_CLOSED: STEP_END,
        EventKind.TAKEAWAY_OPENED: TAKEAWAY,
        EventKind.TAKEAWAY_CLOSED: TAKEAWAY_END,
    }
    assert all(text.startswith(tag_of[e.kind], e.offset) for e in events)


def token_units(t: Trajectory) -> list[tuple[str, str | None]]:
    """The trajectory as the engine sees it: one unit per tag token, one per character of text."""
    units: list[tuple[str, str | None]] = []

    def tag(x: str) -> None:
        units.append((x, x))

    def text(x: str) -> None:
        units.extend((c, None) for c in x)

    def part(open_tag: str, body: str, close_tag: str) -> None:
        tag(open_tag)
        text(body)
        tag(close_tag)

    for b in t.blocks:
        tag(GUIDELINE)
        for p in b.plans:
            part(PLAN, f"{p.id}: {p.text}", PLAN_END)
        tag(GUIDELINE_END)
        for s in b.steps:
            part(STEP, f"{s.id}: {s.text}", STEP_END)
        part(TAKEAWAY, b.takeaway, TAKEAWAY_END)
    text(t.final)
    return units


@FAST
@given(trajectories())
def test_stream_tokens_with_known_tags_give_the_text_events(t: Trajectory) -> None:
    units = token_units(t)
    assert "".join(piece for piece, _ in units) == render(t)
    parser = StreamParser()
    by_token = [e for piece, tag in units for e in parser.feed_token(piece, tag)]
    assert by_token == StreamParser().feed(render(t))


@FEWER
@given(item_text=texts(6), step_id=st.sampled_from(["1", "2.3"]), data=st.data())
def test_stream_branch_mode_closes_the_step(item_text: str, step_id: str, data: st.DataObject) -> None:
    body = f"{step_id}: {item_text}"
    cuts = data.draw(st.lists(st.integers(0, len(body) + len(STEP_END)), max_size=6))
    parser = StreamParser(start="step")
    events = parser.feed_all(split_at(body + STEP_END, cuts))
    assert [(e.kind, e.step_id, e.offset) for e in events] == [(EventKind.STEP_CLOSED, step_id, len(body))]


@FEWER
@given(item_text=texts(6), tag=st.sampled_from([t for t in TAGS if t != STEP_END]), data=st.data())
def test_stream_branch_mode_flags_any_other_tag(item_text: str, tag: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(item_text)))
    events = StreamParser(start="step").feed(f"1: {insert(item_text, at, tag)}{STEP_END}")
    assert events[0].kind == EventKind.VIOLATION and events[0].offset == at + 3
    assert EventKind.STEP_CLOSED not in [e.kind for e in events]


@FAST
@given(st.one_of(tag_soup(), any_text))
def test_stream_violations_agree_with_check(text: str) -> None:
    violations = [e for e in StreamParser().feed(text) if e.kind == EventKind.VIOLATION]
    issues = check(text).issues
    assert bool(violations) == any(i.code in STRUCTURAL for i in issues)
    located = {(i.code, i.offset) for i in issues}
    for e in violations:
        if e.code == "unexpected_tag":
            assert {"tag_between_blocks", "tag_in_final"} & {i.code for i in issues}
        else:
            assert (e.code, e.offset) in located
