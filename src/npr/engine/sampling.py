"""Turning one row of logits into one token: processors, branch-only penalty, temperature, top-k/p."""

from __future__ import annotations

import torch

from npr.engine.params import SamplingParams


def _repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive logits of seen tokens, multiply negative ones."""
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    visible_ids: list[int] | None = None,
    penalised_ids: list[int] | None = None,
) -> int:
    """Pick the next token from `[V]` float32 logits (a copy; the caller keeps the raw ones).

    `visible_ids` go to the logits processors; `penalised_ids` (given only inside a step) get the
    branch repetition penalty. The caller builds them only when they are used: they cost O(length).
    """
    logits = logits.clone()
    for fn in params.logits_processors:
        logits = fn(visible_ids or [], logits)
    if penalised_ids:
        logits = _repetition_penalty(logits, penalised_ids, params.branch_repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = _top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
