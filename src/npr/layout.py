"""Position ids and attention masks for parallel responses: the contract between data, trainer and engine.

A sequence is prompt + response in canonical order (trunk, branch 1 … branch n, takeaway, …). Inside a
block every branch restarts at position g+1 (g = position of `</guideline>`), siblings never see each
other, and the takeaway sits right after the longest branch and sees everything (DESIGN §3). The layout is a
pure function of the token ids, so any trainer can rebuild it from a batch of ids.

>>> from npr.format import TagIds
>>> tags = TagIds(*range(100, 108))   # <guideline>=100 … </takeaway>=107
>>> ids = [1, 2, 100, 102, 5, 103, 102, 6, 103, 101, 104, 7, 105, 104, 8, 9, 105, 106, 3, 107]
>>> lay = build_layout(ids, tags, prompt_len=2)
>>> lay.position_ids.tolist()
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 10, 11, 12, 13, 14, 15, 16]
>>> bool(lay.visible()[14, 11]), bool(lay.visible()[17, 11])   # branch 2 cannot see branch 1; takeaway can
(False, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn.attention.flex_attention import BlockMask

from npr.attention import Kernel, TokenMeta, additive, additive_mask, block_mask, dense_visible
from npr.format import TagIds

PROMPT, TRUNK, BRANCH = 0, 1, 2


class LayoutError(ValueError):
    """A token sequence whose tag structure cannot be laid out; names the token index and the reason."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"token {index}: {reason}")
        self.index, self.reason = index, reason


@dataclass(frozen=True)
class Layout:
    """Per-token positions and segments of one sequence (all tensors `[L]`)."""

    token_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor  # PROMPT / TRUNK / BRANCH
    block: torch.Tensor  # block index of branch tokens, -1 elsewhere
    branch: torch.Tensor  # branch index within its block, -1 elsewhere
    prompt_len: int

    def __len__(self) -> int:
        return len(self.token_ids)

    def meta(self) -> TokenMeta:
        """This sequence alone in a row, as the visibility rule of `npr.attention` reads it."""
        return TokenMeta(torch.zeros_like(self.token_ids)[None], self.block[None], self.branch[None])

    def visible(self) -> torch.Tensor:
        """Bool `[L, L]`: query i may attend to key j (`npr.attention.visible`)."""
        return dense_visible(self.meta())[0, 0]

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive mask `[1, 1, L, L]`: 0 where visible, finfo.min elsewhere (a bool mask is silently
        misread by eager attention)."""
        return additive(self.visible(), dtype)[None, None]

    @property
    def critical_path(self) -> int:
        """Response tokens on the longest path: the number of distinct positions after the prompt."""
        response = self.position_ids[self.prompt_len :]
        return int(response.max().item() - self.prompt_len + 1) if len(response) else 0


def build_layout(
    token_ids: Sequence[int] | torch.Tensor,
    tag_ids: TagIds,
    prompt_len: int,
    *,
    parallel: bool = True,
    strict: bool = True,
) -> Layout:
    """Lay out prompt + response token ids.

    `parallel=False` gives the plain causal layout of a sequential response (tags are ordinary tokens).
    `strict=False` accepts a response cut off inside a block (a budget stop): branches that end without
    `</step>` (a `<step>` inside an open step starts the next sibling) and a missing takeaway are
    tolerated; every other violation still raises.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    n = len(ids)
    if not 0 <= prompt_len <= n:
        raise LayoutError(0, f"prompt_len {prompt_len} outside [0, {n}]")
    segment = torch.full((n,), TRUNK, dtype=torch.long)
    segment[:prompt_len] = PROMPT
    block = torch.full((n,), -1, dtype=torch.long)
    branch = torch.full((n,), -1, dtype=torch.long)
    if not parallel:
        return Layout(ids, torch.arange(n), segment, block, branch, prompt_len)
    positions = _walk(ids.tolist(), tag_ids, prompt_len, block, branch, strict)
    segment[block >= 0] = BRANCH
    return Layout(ids, torch.tensor(positions, dtype=torch.long), segment, block, branch, prompt_len)


def _walk(
    ids: list[int], t: TagIds, prompt_len: int, block: torch.Tensor, branch: torch.Tensor, strict: bool
) -> list[int]:
    """One pass over the response: assign positions, fill block/branch ids, raise on bad structure."""
    tags = set(t.as_tuple())
    positions = list(range(prompt_len))
    pos = prompt_len  # next trunk position
    region = "trunk"  # trunk | guideline | plan | steps | step | takeaway
    n_blocks, n_plans, g, step_start = 0, 0, 0, 0
    branch_lens: list[int] = []  # tokens per branch of the current block
    for i in range(prompt_len, len(ids)):
        tok = ids[i]
        if region == "step" and tok == t.step_open and not strict:
            region = "steps"  # a cut response: the open branch ended without </step>; this is its sibling
        if region == "step":
            if tok != t.step_close and tok in tags:
                raise LayoutError(i, f"tag {t.tag_of(tok)} inside a step")
            positions.append(g + 1 + branch_lens[-1])
            block[i], branch[i] = n_blocks - 1, len(branch_lens) - 1
            branch_lens[-1] += 1
            if tok == t.step_close:
                region = "steps"
            continue
        if region == "plan" and tok != t.plan_close and tok in tags:
            raise LayoutError(i, f"tag {t.tag_of(tok)} inside a plan")
        if region == "steps":
            if tok == t.step_open:
                region, step_start = "step", i
                branch_lens.append(1)
                positions.append(g + 1)
                block[i], branch[i] = n_blocks - 1, len(branch_lens) - 1
                continue
            if tok != t.takeaway_open:
                raise LayoutError(i, "only <step> or <takeaway> may follow </guideline> or </step>")
            if len(branch_lens) != n_plans:
                raise LayoutError(i, f"#steps ({len(branch_lens)}) != #plans ({n_plans})")
            pos = g + 1 + max(branch_lens)
            region = "takeaway"
        elif tok == t.guideline_open:
            if region != "trunk":
                raise LayoutError(i, f"<guideline> inside an open {region}")
            region, n_plans = "guideline", 0
        elif tok == t.plan_open:
            if region != "guideline":
                raise LayoutError(i, "<plan> outside a guideline")
            region, n_plans = "plan", n_plans + 1
        elif tok == t.plan_close:
            if region != "plan":
                raise LayoutError(i, "</plan> without <plan>")
            region = "guideline"
        elif tok == t.guideline_close:
            if region != "guideline":
                raise LayoutError(i, "</guideline> without <guideline>")
            if n_plans == 0:
                raise LayoutError(i, "guideline with no plan")
            region, g, branch_lens = "steps", pos, []
            n_blocks += 1
        elif tok in (t.step_open, t.step_close):
            raise LayoutError(i, "step tag outside a block's step section")
        elif tok == t.takeaway_open:
            raise LayoutError(i, "<takeaway> outside a block")
        elif tok == t.takeaway_close:
            if region != "takeaway":
                raise LayoutError(i, "</takeaway> without <takeaway>")
            region = "trunk"
        positions.append(pos)
        pos += 1
    if strict and region == "step":
        raise LayoutError(step_start, "unclosed step")
    if strict and region == "steps":
        raise LayoutError(len(ids), "block ends without <takeaway>")
    return positions


@dataclass(frozen=True)
class LayoutBatch:
    """Rows of layouts, right-padded to one length; a row holds one sequence or several packed ones.

    The batch keeps the per-token metadata, not a mask: `attention_mask` (dense, built on first use) or
    `block_mask()` (FlexAttention) come from it, by the one rule of `npr.attention`.
    """

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    meta: TokenMeta  # [B, L] each
    token_mask: torch.Tensor  # [B, L] bool, True on real tokens
    dtype: torch.dtype = torch.float32  # of the dense additive mask

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """Additive `[B, 1, L, L]` in `dtype`."""
        return additive_mask(self.meta, self.dtype)

    def block_mask(self) -> BlockMask:
        return block_mask(self.meta)

    def mask(self, kind: Kernel) -> torch.Tensor | BlockMask:
        """The attention mask a model with `kind` attention takes."""
        return self.block_mask() if kind == "flex" else self.attention_mask

    def to(self, device: torch.device | str) -> LayoutBatch:
        return LayoutBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.meta.to(device),
            self.token_mask.to(device),
            self.dtype,
        )


def pack_layouts(
    rows: Sequence[Sequence[Layout]], pad_id: int, dtype: torch.dtype = torch.float32, length: int = 0
) -> LayoutBatch:
    """One row per inner sequence: its layouts back to back (no attention across them), then padding to
    the longest row, or to `length` if longer (a fixed shape spares a compiled kernel its recompiles).

    Positions restart at each layout's own; block ids are made unique within the row.
    """
    if not rows or not all(rows):
        raise ValueError("pack_layouts needs at least one row, each with at least one layout")
    b, n = len(rows), max(length, *(sum(len(x) for x in row) for row in rows))
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, n), dtype=torch.long)
    document, block, branch = (torch.full((b, n), -1, dtype=torch.long) for _ in range(3))
    for r, row in enumerate(rows):
        start, blocks = 0, 0
        for d, lay in enumerate(row):
            span = slice(start, start + len(lay))
            input_ids[r, span] = lay.token_ids
            position_ids[r, span] = lay.position_ids
            document[r, span] = d
            block[r, span] = torch.where(lay.block >= 0, lay.block + blocks, -1)
            branch[r, span] = lay.branch
            blocks += int(lay.block.max()) + 1 if len(lay) else 0
            start += len(lay)
    return LayoutBatch(input_ids, position_ids, TokenMeta(document, block, branch), document >= 0, dtype)


def collate_layouts(
    layouts: Sequence[Layout], pad_id: int, dtype: torch.dtype = torch.float32
) -> LayoutBatch:
    """One layout per row, right-padded; padded query rows see only themselves so softmax stays finite."""
    if not layouts:
        raise ValueError("collate_layouts needs at least one layout")
    return pack_layouts([[lay] for lay in layouts], pad_id, dtype)
