"""The visibility rule of npr.attention: its dense mask and its FlexAttention BlockMask agree with the layout
and with each other, on packed rows of random layouts (several blocks, responses cut by the budget)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from npr.attention import block_mask, dense_visible, mask_mod, resolve_attention, use_attention
from npr.layout import Layout, build_layout, pack_layouts
from npr.model import tiny_model
from tests.strategies import FAST, TAG_IDS, TokenCase, token_cases


@st.composite
def layouts(draw) -> Layout:
    """A random valid layout, or a prefix of one cut anywhere (what the engine's budget stop returns)."""
    case: TokenCase = draw(token_cases(min_prompt=1, max_blocks=3))
    cut = draw(st.one_of(st.just(len(case.ids)), st.integers(case.prompt_len, len(case.ids))))
    return build_layout(list(case.ids[:cut]), TAG_IDS, case.prompt_len, strict=False)


packed_rows = st.lists(st.lists(layouts(), min_size=1, max_size=3), min_size=1, max_size=3)


@FAST
@given(packed_rows)
def test_packed_mask_is_each_layouts_own_mask_on_the_diagonal(rows: list[list[Layout]]) -> None:
    batch = pack_layouts(rows, pad_id=0)
    dense = dense_visible(batch.meta)[:, 0]  # [B, L, L]
    b, n = batch.input_ids.shape
    assert torch.equal(dense, create_mask(mask_mod(batch.meta), b, 1, n, n)[:, 0])  # one rule, two builders
    for r, row in enumerate(rows):
        want = torch.eye(n, dtype=torch.bool)  # padding sees only itself; nothing sees across documents
        start = 0
        for lay in row:
            want[start : start + len(lay), start : start + len(lay)] = lay.visible()
            assert torch.equal(batch.position_ids[r, start : start + len(lay)], lay.position_ids)
            start += len(lay)
        assert torch.equal(dense[r], want)
        assert batch.token_mask[r].tolist() == [True] * start + [False] * (n - start)


@functools.cache
def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    dense, _ = tiny_model()
    flex, _ = tiny_model()
    use_attention(flex, "flex")
    return dense.eval(), flex.eval()


@settings(FAST, max_examples=12)
@given(st.lists(st.lists(layouts(), min_size=1, max_size=3), min_size=2, max_size=2))
def test_flex_forward_equals_dense_forward(rows: list[list[Layout]]) -> None:
    """Two rows padded to one shape, so eager flex compiles its kernel once, not once per example."""
    dense_model, flex_model = _models()
    batch = pack_layouts(rows, pad_id=0, length=192)
    with torch.no_grad():
        kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
        dense = dense_model(**kwargs, attention_mask=batch.mask("dense")).logits
        flex = flex_model(**kwargs, attention_mask=batch.mask("flex")).logits
    real = batch.token_mask
    assert (dense[real] - flex[real]).abs().max() < 1e-5


def test_block_mask_skips_tiles_across_documents() -> None:
    """Two 256-token documents in a 512-token row: the tiles pairing them are never computed."""
    row = [build_layout(list(range(256)), TAG_IDS, 256)] * 2
    mask = block_mask(pack_layouts([row], pad_id=0).meta, compiled=False)
    tiles = mask.to_dense()[0, 0]  # [4, 4] tiles of 128: 1 where any pair is visible
    assert tiles.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_attention_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, backward=True) == "dense"
    assert resolve_attention("auto", cuda, backward=True) == "flex"
    assert resolve_attention("flex", cpu, backward=False) == "flex"  # a CPU log-prob pass may use flex
    with pytest.raises(ValueError, match="flex cannot train on cpu"):
        resolve_attention("flex", cpu, backward=True)
