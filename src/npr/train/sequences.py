"""Prompt+response sequences laid out for one forward pass: the trainer's side of the parity invariant.

The engine's log-probs and the trainer's must agree (DESIGN §3), so every trainer builds its batches here:
the same `npr.layout` positions and masks, the same t−1 predictor, float32 log-softmax of raw logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from npr.attention import Kernel
from npr.engine.rollout import Rollout
from npr.format import TagIds, canonicalize
from npr.layout import LayoutBatch, build_layout, pack_layouts
from npr.train.losses import token_logprobs


@dataclass(frozen=True)
class TrainExample:
    """One training sequence: prompt ids, response ids and which response tokens carry loss."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # per response token
    parallel: bool = True
    old_logprobs: list[float] | None = None  # per response token (RL: the sampling policy's)


@dataclass(frozen=True)
class TrainBatch:
    """Examples laid out in rows (one per row, or packed); per-token tensors are `[B, L]`."""

    layout: LayoutBatch
    loss_mask: Tensor  # [B, L] float, 1 on trained response tokens
    old_logprobs: Tensor  # [B, L] float, 0 where unknown
    example: Tensor  # [B, L] long: index of the token's example in the `examples` given; -1 on padding

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def per_token(self, values: Tensor) -> Tensor:
        """Per-example values `[N]` (e.g. advantages) spread over their tokens: `[B, L]`, 0 on padding."""
        spread = values.to(self.loss_mask.device, self.loss_mask.dtype)[self.example.clamp(min=0)]
        return spread.masked_fill(self.example < 0, 0.0)

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(
            self.layout.to(device),
            self.loss_mask.to(device),
            self.old_logprobs.to(device),
            self.example.to(device),
        )


def encode_response(tokenizer, text: str, *, parallel: bool = True) -> list[int]:
    """SFT target ids: canonical text (parallel) with tags as their special ids, then end-of-sequence."""
    if parallel:
        text = canonicalize(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def sft_example(prompt_ids: list[int], response_ids: list[int], *, parallel: bool = True) -> TrainExample:
    """In SFT every response token carries loss (DESIGN §3)."""
    return TrainExample(list(prompt_ids), list(response_ids), [1] * len(response_ids), parallel)


def rollout_example(rollout: Rollout) -> TrainExample:
    """In RL only sampled tokens carry loss; forced ones (<step>, ID:, <takeaway>) do not."""
    return TrainExample(
        rollout.prompt_ids,
        rollout.token_ids,
        rollout.loss_mask,
        rollout.mode == "parallel",
        rollout.sampled_logprobs,
    )


def make_batch(
    examples: Sequence[TrainExample],
    tags: TagIds,
    pad_id: int,
    *,
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
    rows: Sequence[Sequence[int]] | None = None,
) -> TrainBatch:
    """Lay out examples, one per row or packed as `rows` says (indices into `examples` per row; see
    `npr.train.packing`), right-padded; raises LayoutError (naming the token) on a malformed sequence.

    `dtype` is the dense mask's: the model's compute dtype.
    """
    layouts = [
        build_layout(
            e.prompt_ids + e.response_ids, tags, len(e.prompt_ids), parallel=e.parallel, strict=strict
        )
        for e in examples
    ]
    grouping = [[i] for i in range(len(examples))] if rows is None else rows
    batch = pack_layouts([[layouts[i] for i in row] for row in grouping], pad_id, dtype)
    b, n = batch.input_ids.shape
    loss_mask = torch.zeros(b, n)
    old = torch.zeros(b, n)
    example = torch.full((b, n), -1, dtype=torch.long)
    for r, row in enumerate(grouping):
        start = 0
        for i in row:
            e = examples[i]
            p, m = start + len(e.prompt_ids), len(e.response_ids)
            example[r, start : p + m] = i
            loss_mask[r, p : p + m] = torch.tensor(e.loss_mask, dtype=torch.float32)
            if e.old_logprobs is not None:
                old[r, p : p + m] = torch.tensor(e.old_logprobs, dtype=torch.float32)
            start = p + m
    return TrainBatch(batch, loss_mask, old, example)


def compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention runs in: autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def layout_forward(model, batch: TrainBatch, attention: Kernel = "dense") -> Tensor:
    """`[B, L, V]` logits of one forward over `batch` with its layout's mask and positions.

    `attention` must match the model's kernel (`npr.attention.use_attention`): a dense additive mask for
    SDPA/eager, a BlockMask for flex.
    """
    lay = batch.layout
    mask = lay.mask(attention)
    if isinstance(mask, Tensor):
        mask = mask.to(compute_dtype(model, lay.input_ids.device))
    return model(input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=mask).logits


def forward_logprobs(model, batch: TrainBatch, attention: Kernel = "dense") -> Tensor:
    """`[B, L]` float32 log-prob of every token from one forward with the layout's mask and positions."""
    return token_logprobs(layout_forward(model, batch, attention), batch.layout.input_ids)
