"""Property tests for npr.layout: the position rule, the attention rule and the structural errors (DESIGN §3).

Random valid token sequences come with the spans of their parts (tests/strategies.py), so each rule is stated
from the spans, not from the layout's own bookkeeping.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npr.layout import BRANCH, PROMPT, TRUNK, Layout, LayoutError, build_layout, collate_layouts
from tests.strategies import FAST, FEWER, ORDINARY, TAG_IDS, TokenCase, token_cases

T = TAG_IDS
ALL_TAGS = list(T.as_tuple())


def lay_out(case: TokenCase, ids: list[int] | tuple[int, ...] | None = None, **kw) -> Layout:
    return build_layout(list(case.ids if ids is None else ids), T, case.prompt_len, **kw)


def raises_at(ids: list[int], prompt_len: int, index: int, reason: str) -> None:
    with pytest.raises(LayoutError) as err:
        build_layout(ids, T, prompt_len)
    assert err.value.index == index, err.value
    assert reason in err.value.reason and str(index) in str(err.value)


def trunk_slots(case: TokenCase) -> list[int]:
    """Indices where a token may be inserted in the trunk (outside any block)."""
    return [case.prompt_len, *(b.takeaway_close + 1 for b in case.blocks)]


# ----------------------------------------------------------------------------------------------------------
# Positions


@FAST
@given(token_cases())
def test_positions_follow_the_rule(case: TokenCase) -> None:
    pos = lay_out(case).position_ids.tolist()
    branch_start = {s: (blk, s, e) for blk in case.blocks for s, e in blk.branches}
    takeaways = {blk.takeaway: blk for blk in case.blocks}
    expected = 0
    i = 0
    while i < len(pos):
        if i in branch_start:  # each branch restarts at g+1 and counts up
            blk, s, e = branch_start[i]
            g = pos[blk.guideline_close]
            assert pos[s:e] == list(range(g + 1, g + 1 + e - s))
            i = e
            continue
        if i in takeaways:  # right after the longest branch
            blk = takeaways[i]
            expected = pos[blk.guideline_close] + 1 + max(e - s for s, e in blk.branches)
        assert pos[i] == expected, i  # prompt and trunk count up by one, and counting continues
        expected += 1
        i += 1


@FEWER
@given(token_cases())
def test_segments_and_branch_indices(case: TokenCase) -> None:
    lay = lay_out(case)
    want_segment = [PROMPT if i < case.prompt_len else TRUNK for i in range(len(case.ids))]
    want_block, want_branch = [-1] * len(case.ids), [-1] * len(case.ids)
    for b, blk in enumerate(case.blocks):
        for k, (s, e) in enumerate(blk.branches):
            for i in range(s, e):
                want_segment[i], want_block[i], want_branch[i] = BRANCH, b, k
    assert lay.segment.tolist() == want_segment
    assert lay.block.tolist() == want_block and lay.branch.tolist() == want_branch


@FEWER
@given(token_cases())
def test_critical_path_counts_distinct_response_positions(case: TokenCase) -> None:
    lay = lay_out(case)
    assert lay.critical_path == len(set(lay.position_ids[case.prompt_len :].tolist()))
    # every branch but the longest runs alongside it
    saved = sum(
        sum(e - s for s, e in blk.branches) - max(e - s for s, e in blk.branches) for blk in case.blocks
    )
    assert lay.critical_path == len(case.ids) - case.prompt_len - saved


def test_critical_path_of_an_empty_response() -> None:
    assert build_layout([1, 2, 3], T, 3).critical_path == 0


# ----------------------------------------------------------------------------------------------------------
# Attention


@FAST
@given(token_cases())
def test_visibility_is_causal_minus_siblings(case: TokenCase) -> None:
    vis = lay_out(case).visible()
    n = len(case.ids)
    sibling = torch.zeros(n, n, dtype=torch.bool)
    for blk in case.blocks:
        for a, (sa, ea) in enumerate(blk.branches):
            for b, (sb, eb) in enumerate(blk.branches):
                sibling[sa:ea, sb:eb] = a != b
    assert not vis.triu(1).any()  # no future
    assert not (vis & sibling).any()  # siblings never see each other, both directions
    for blk in case.blocks:
        first = blk.branches[0][0]
        assert vis[blk.takeaway :, first : blk.takeaway].all()  # the takeaway onward sees all branches
        for s, e in blk.branches:  # a branch sees the prompt, the trunk, earlier blocks and itself
            own = torch.ones(e - s, e - s, dtype=torch.bool).tril()
            assert vis[s:e, :first].all() and vis[s:e, s:e].equal(own)
    # and nothing else is hidden
    assert torch.equal(vis, torch.ones(n, n, dtype=torch.bool).tril() & ~sibling)


@FAST
@given(token_cases(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_additive_mask_dtype_and_values(case: TokenCase, dtype: torch.dtype) -> None:
    lay = lay_out(case)
    mask = lay.attention_mask(dtype)
    n = len(case.ids)
    assert mask.shape == (1, 1, n, n) and mask.dtype == dtype
    low = torch.finfo(dtype).min
    assert torch.equal(mask[0, 0] == 0, lay.visible())
    assert torch.equal(mask[0, 0] != 0, mask[0, 0] == low)


@FEWER
@given(token_cases())
def test_sequential_layout_is_plain_causal(case: TokenCase) -> None:
    lay = lay_out(case, parallel=False)
    n = len(case.ids)
    assert lay.position_ids.tolist() == list(range(n))
    assert torch.equal(lay.visible(), torch.ones(n, n, dtype=torch.bool).tril())
    assert (lay.block == -1).all() and lay.critical_path == n - case.prompt_len


@FAST
@given(
    st.lists(token_cases(max_blocks=2), min_size=1, max_size=3),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_collate_pads_each_layout_unchanged(cases: list[TokenCase], dtype: torch.dtype) -> None:
    layouts = [lay_out(c) for c in cases]
    batch = collate_layouts(layouts, pad_id=-7, dtype=dtype)
    b, n = len(cases), max(len(c.ids) for c in cases)
    assert batch.input_ids.shape == batch.position_ids.shape == batch.token_mask.shape == (b, n)
    assert batch.attention_mask.shape == (b, 1, n, n) and batch.attention_mask.dtype == dtype
    low = torch.finfo(dtype).min
    for row, lay in enumerate(layouts):
        m = len(lay)
        assert batch.input_ids[row, :m].tolist() == lay.token_ids.tolist()
        assert (batch.input_ids[row, m:] == -7).all()
        assert torch.equal(batch.position_ids[row, :m], lay.position_ids)
        assert batch.token_mask[row].tolist() == [True] * m + [False] * (n - m)
        assert torch.equal(batch.attention_mask[row, :, :m, :m], lay.attention_mask(dtype)[0])
        assert (batch.attention_mask[row, 0, :m, m:] == low).all()  # real tokens never see padding
    probs = torch.softmax(batch.attention_mask.float(), dim=-1)
    assert torch.isfinite(probs).all()


def test_collate_needs_a_layout() -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate_layouts([], pad_id=0)


# ----------------------------------------------------------------------------------------------------------
# Structural violations


@FEWER
@given(token_cases(), st.sampled_from([t for t in ALL_TAGS if t != T.step_close]), st.data())
def test_tag_inside_a_step(case: TokenCase, tag: int, data: st.DataObject) -> None:
    """Nested <step>, <takeaway> inside a step, and any other tag there."""
    blk = data.draw(st.sampled_from(case.blocks))
    s, e = data.draw(st.sampled_from(blk.branches))
    at = data.draw(st.integers(s + 1, e - 1))
    ids = list(case.ids)
    ids.insert(at, tag)
    raises_at(ids, case.prompt_len, at, "inside a step")


@FEWER
@given(token_cases(), st.data())
def test_unclosed_step(case: TokenCase, data: st.DataObject) -> None:
    blk = data.draw(st.sampled_from(case.blocks))
    s, e = data.draw(st.sampled_from(blk.branches))
    cut = data.draw(st.integers(s + 1, e - 1))  # keeps <step>, drops </step>
    raises_at(list(case.ids[:cut]), case.prompt_len, s, "unclosed step")


@FAST
@given(token_cases(), st.data())
def test_non_strict_prefix_is_the_prefix_of_the_layout(case: TokenCase, data: st.DataObject) -> None:
    """A sequence cut anywhere (inside a branch, a guideline, a takeaway) lays out as the full one does."""
    cut = data.draw(st.integers(case.prompt_len, len(case.ids)))
    full = lay_out(case)
    part = lay_out(case, case.ids[:cut], strict=False)
    assert torch.equal(part.position_ids, full.position_ids[:cut])
    assert torch.equal(part.visible(), full.visible()[:cut, :cut])


@FAST
@given(token_cases(), st.data())
def test_non_strict_accepts_branches_cut_by_the_budget(case: TokenCase, data: st.DataObject) -> None:
    """The engine's budget stop: branches of the last block may lose a tail (</step> included) and the
    takeaway never comes. Every kept token keeps its position and what it sees; strict mode refuses it."""
    blk = case.blocks[-1]
    kept = list(range(blk.guideline_close + 1))
    for s, e in blk.branches:
        kept += range(s, data.draw(st.integers(s + 1, e)))
    full = lay_out(case)
    part = lay_out(case, [case.ids[i] for i in kept], strict=False)
    assert part.position_ids.tolist() == full.position_ids[kept].tolist()
    assert torch.equal(part.visible(), full.visible()[kept][:, kept])
    with pytest.raises(LayoutError):  # strict: a cut is an error
        lay_out(case, [case.ids[i] for i in kept])


@FEWER
@given(token_cases(), st.data())
def test_strict_rejects_a_sequence_cut_between_guideline_and_takeaway(
    case: TokenCase, data: st.DataObject
) -> None:
    blk = data.draw(st.sampled_from(case.blocks))
    cut = data.draw(st.integers(blk.guideline_close + 1, blk.takeaway))
    with pytest.raises(LayoutError):
        lay_out(case, case.ids[:cut])


@FEWER
@given(token_cases(), st.booleans(), st.data())
def test_steps_must_match_plans(case: TokenCase, drop_branch: bool, data: st.DataObject) -> None:
    b = data.draw(st.integers(0, len(case.blocks) - 1))
    blk = case.blocks[b]
    ids = list(case.ids)
    if drop_branch:
        s, e = data.draw(st.sampled_from(blk.branches))
        del ids[s:e]
        at = blk.takeaway - (e - s)
    else:  # one more plan
        ids[blk.guideline_close : blk.guideline_close] = [T.plan_open, 5, T.plan_close]
        at = blk.takeaway + 3
    raises_at(ids, case.prompt_len, at, "#steps")


@FEWER
@given(token_cases(), st.data())
def test_plan_outside_a_guideline(case: TokenCase, data: st.DataObject) -> None:
    inside_takeaways = [i for blk in case.blocks for i in range(blk.takeaway + 1, blk.takeaway_close + 1)]
    at = data.draw(st.sampled_from(trunk_slots(case) + inside_takeaways))
    ids = list(case.ids)
    ids.insert(at, T.plan_open)
    raises_at(ids, case.prompt_len, at, "<plan> outside a guideline")


@FEWER
@given(token_cases(), st.data())
def test_plan_tags_must_pair(case: TokenCase, data: st.DataObject) -> None:
    """A </plan> outside a plan, or a tag inside a plan, breaks the guideline."""
    ids = list(case.ids)
    if data.draw(st.booleans()):
        at = data.draw(st.sampled_from(trunk_slots(case)))
        ids.insert(at, T.plan_close)
    else:
        s, e = data.draw(st.sampled_from([p for blk in case.blocks for p in blk.plans]))
        at = data.draw(st.integers(s + 1, e - 1))
        ids.insert(at, data.draw(st.sampled_from([t for t in ALL_TAGS if t != T.plan_close])))
    raises_at(ids, case.prompt_len, at, "plan")


@FEWER
@given(token_cases(), st.data())
def test_takeaway_close_without_open(case: TokenCase, data: st.DataObject) -> None:
    at = data.draw(st.sampled_from(trunk_slots(case)))
    ids = list(case.ids)
    ids.insert(at, T.takeaway_close)
    raises_at(ids, case.prompt_len, at, "</takeaway> without <takeaway>")


@FEWER
@given(token_cases(), st.data())
def test_guideline_without_plans(case: TokenCase, data: st.DataObject) -> None:
    blk = data.draw(st.sampled_from(case.blocks))
    ids = list(case.ids)
    del ids[blk.guideline + 1 : blk.guideline_close]
    raises_at(ids, case.prompt_len, blk.guideline + 1, "no plan")


@FEWER
@given(token_cases(), ORDINARY, st.data())
def test_stray_token_between_steps(case: TokenCase, token: int, data: st.DataObject) -> None:
    blk = data.draw(st.sampled_from(case.blocks))
    at = data.draw(st.sampled_from([blk.guideline_close + 1, *(e for _, e in blk.branches)]))
    ids = list(case.ids)
    ids.insert(at, token)
    raises_at(ids, case.prompt_len, at, "may follow")


@pytest.mark.parametrize("prompt_len", [-1, 4])
def test_prompt_len_out_of_range(prompt_len: int) -> None:
    with pytest.raises(LayoutError, match="prompt_len"):
        build_layout([1, 2, 3], T, prompt_len)


def test_token_ids_as_a_batch_row_tensor() -> None:
    ids = [1, T.guideline_open, T.plan_open, 2, T.plan_close, T.guideline_close, T.step_open, 3, T.step_close]
    ids += [T.takeaway_open, T.takeaway_close]
    assert torch.equal(
        build_layout(torch.tensor([ids]), T, 1).position_ids, build_layout(ids, T, 1).position_ids
    )


def test_no_block_is_a_plain_trunk() -> None:
    lay = build_layout([1, 2, 3, 4], T, 2)
    assert lay.position_ids.tolist() == [0, 1, 2, 3] and (lay.segment[2:] == TRUNK).all()
