"""Who may attend to whom: one rule over per-token metadata, two mask forms made from it (DESIGN §3, §5).

A row of tokens (one sequence, or several packed into one row) carries, per token, its document (-1 on
padding), its block and its branch within that block (-1 outside branches). `visible` is the whole rule:

    query q sees key k  ⇔  q = k,  or  (q is real, k is in q's document, k ≤ q, and k is not in a sibling
                                        branch of q: same block, other branch)

From that one function come both masks, so they cannot disagree:
- `dense_visible` / `additive_mask`: a `[B, 1, L, L]` tensor (what `create_mask` gives), for eager/SDPA attention and
  for every CPU backward (FlexAttention has no backward on CPU);
- `block_mask`: a FlexAttention `BlockMask` (`create_block_mask`), O(L²/128²) memory instead of O(L²),
  whose fully masked tiles (other documents, sibling branches) are skipped.

Padding rows see only themselves, so softmax stays finite; real tokens never see padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

Attention = Literal["auto", "dense", "flex"]  # a config's choice
Kernel = Literal["dense", "flex"]  # what a forward runs
FLEX_BLOCK = 128  # FlexAttention's tile: a BlockMask stores one entry per 128×128 tile


@dataclass(frozen=True)
class TokenMeta:
    """Per-token metadata of a batch of rows, `[B, L]` long each: what the visibility rule reads."""

    document: Tensor  # index of the sequence within its row; -1 on padding
    block: Tensor  # block id, unique within the row; -1 outside branches
    branch: Tensor  # branch index within its block; -1 outside branches

    def to(self, device: torch.device | str) -> TokenMeta:
        return TokenMeta(self.document.to(device), self.block.to(device), self.branch.to(device))

    @property
    def shape(self) -> tuple[int, int]:
        b, n = self.document.shape
        return b, n


def visible(
    q: Tensor,
    k: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    q_block: Tensor,
    k_block: Tensor,
    q_br: Tensor,
    k_br: Tensor,
) -> Tensor:
    """The rule, elementwise over broadcastable tensors: may query index q see key index k?"""
    siblings = (q_block >= 0) & (q_block == k_block) & (q_br != k_br)
    return (q == k) | ((q_doc >= 0) & (q_doc == k_doc) & (k <= q) & ~siblings)


MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def mask_mod(meta: TokenMeta) -> MaskMod:
    """The rule as FlexAttention's `mask_mod(b, h, q_idx, kv_idx)`, reading `meta` by index."""
    doc, block, branch = meta.document, meta.block, meta.branch

    def rule(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return visible(q, k, doc[b, q], doc[b, k], block[b, q], block[b, k], branch[b, q], branch[b, k])

    return rule


def dense_visible(meta: TokenMeta) -> Tensor:
    """Bool `[B, 1, L, L]`: the rule broadcast over all (query, key) pairs.

    The same `visible` that `mask_mod` applies per pair, so it equals `create_mask(mask_mod(meta), …)`
    (tested) without that function's per-element vmap.
    """
    _, n = meta.shape
    idx = torch.arange(n, device=meta.document.device)
    doc, block, branch = meta.document, meta.block, meta.branch
    rule = visible(
        idx[:, None], idx[None, :],
        doc[:, :, None], doc[:, None, :],
        block[:, :, None], block[:, None, :],
        branch[:, :, None], branch[:, None, :],
    )  # fmt: skip
    return rule[:, None]


def additive(visible_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where visible, finfo(dtype).min elsewhere: a bool mask is silently misread by eager attention."""
    mask = torch.zeros(visible_mask.shape, dtype=dtype, device=visible_mask.device)
    return mask.masked_fill_(~visible_mask, torch.finfo(dtype).min)


def additive_mask(meta: TokenMeta, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive float `[B, 1, L, L]` in `dtype` (the model's compute dtype)."""
    return additive(dense_visible(meta), dtype)


_compiled_create_block_mask = torch.compile(create_block_mask)


def block_mask(meta: TokenMeta, block_size: int = FLEX_BLOCK, *, compiled: bool = True) -> BlockMask:
    """FlexAttention `BlockMask` of the rule, shared by all heads.

    `compiled` builds it with `torch.compile(create_block_mask)`, which never materialises the `[L, L]`
    mask (eager creation briefly holds several L² int64 tensors: 250 MiB at L = 4k); the first call per
    shape compiles (seconds), later ones take milliseconds.
    """
    b, n = meta.shape
    make = _compiled_create_block_mask if compiled else create_block_mask
    return make(mask_mod(meta), b, None, n, n, device=meta.document.device, BLOCK_SIZE=block_size)


def resolve_attention(kind: Attention, device: torch.device, *, backward: bool) -> Kernel:
    """`auto` is flex on CUDA and dense elsewhere; flex with a backward pass on CPU is refused
    (FlexAttention has no CPU backward)."""
    if kind == "auto":
        return "flex" if device.type == "cuda" else "dense"
    if kind == "flex" and backward and device.type != "cuda":
        raise ValueError(
            f"attention: flex cannot train on {device.type}: FlexAttention has no backward there; "
            "use attention: dense (or auto)"
        )
    return kind


def use_attention(model: torch.nn.Module, kind: Kernel) -> None:
    """Switch a Hugging Face model's attention kernel: SDPA with a dense mask, or FlexAttention with a
    BlockMask (a dense mask under flex crashes on CPU, DESIGN §10)."""
    model.set_attn_implementation("flex_attention" if kind == "flex" else "sdpa")  # type: ignore[operator]
