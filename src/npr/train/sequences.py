"""Prompt+response sequences laid out for one forward pass: the trainer's side of the parity invariant.

The engine's log-probs and the trainer's must agree (DESIGN §3), so every trainer builds its batches here:
the same `npr.layout` positions and masks, the same t−1 predictor, float32 log-softmax of raw logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from npr.engine.rollout import Rollout
from npr.format import TagIds, canonicalize
from npr.layout import LayoutBatch, build_layout, collate_layouts
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
    layout: LayoutBatch
    loss_mask: Tensor  # [B, L] float, 1 on trained response tokens
    old_logprobs: Tensor  # [B, L] float, 0 where unknown

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> TrainBatch:
        lay = self.layout
        moved = LayoutBatch(
            lay.input_ids.to(device),
            lay.position_ids.to(device),
            lay.attention_mask.to(device),
            lay.token_mask.to(device),
        )
        return TrainBatch(moved, self.loss_mask.to(device), self.old_logprobs.to(device))


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
) -> TrainBatch:
    """Lay out and right-pad examples; raises LayoutError (naming the token) on a malformed sequence."""
    layouts = [
        build_layout(
            e.prompt_ids + e.response_ids, tags, len(e.prompt_ids), parallel=e.parallel, strict=strict
        )
        for e in examples
    ]
    batch = collate_layouts(layouts, pad_id, dtype)
    b, n = batch.input_ids.shape
    loss_mask = torch.zeros(b, n)
    old = torch.zeros(b, n)
    for row, e in enumerate(examples):
        p, r = len(e.prompt_ids), len(e.response_ids)
        loss_mask[row, p : p + r] = torch.tensor(e.loss_mask, dtype=torch.float32)
        if e.old_logprobs is not None:
            old[row, p : p + r] = torch.tensor(e.old_logprobs, dtype=torch.float32)
    return TrainBatch(batch, loss_mask, old)


def forward_logprobs(model, batch: TrainBatch) -> Tensor:
    """`[B, L]` log-prob of every token from one forward with the layout's mask and positions."""
    lay = batch.layout
    logits = model(
        input_ids=lay.input_ids,
        position_ids=lay.position_ids,
        attention_mask=lay.attention_mask.to(model.dtype),
    ).logits  # [B, L, V]
    return token_logprobs(logits, lay.input_ids)
