"""Token-level losses for SFT and policy-gradient RL (DESIGN §5).

One convention for every function here: per-token tensors are `[B, T]` and aligned to the *tokens* of
the sequences (not to the logits that predict them), and `loss_mask[b, t]` says whether token t of
sequence b is trained (a response token). Every loss is a token mean over the whole batch,

    Σ_{b,t} term[b, t] · mask[b, t] / num_tokens,    num_tokens = Σ mask by default,

so long responses weigh more than short ones (DAPO's token-level loss; PAPO's 1/Σ|y_i|). When a batch is
split into pieces (gradient accumulation, DDP ranks), pass the full batch's `num_tokens` to each piece
(divided by the world size under DDP, which averages gradients) so that the pieces add up to the loss of
the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, token_ids: Tensor, predictor: Tensor | None = None) -> Tensor:
    """Log-probability of each token under the logits that predict it: `[B, T]`, aligned to tokens.

    `logits` `[B, T, V]` come from one forward pass over `token_ids` `[B, T]`. The result is
    `out[b, t] = log_softmax(logits[b, predictor[b, t]])[token_ids[b, t]]`, where the predictor of token t
    defaults to t − 1 (causal: the logits at position t − 1 predict token t). Token 0 has no predictor,
    so `out[:, 0] = 0`: keep it out of the loss mask (it is a prompt token anyway).

    In a parallel layout a token's flattened predecessor is not always its parent: the first token of
    branch i > 1 follows the last token of branch i − 1, which it cannot see. `predictor` `[B, T]` (an
    index before t for every t ≥ 1; column 0 is ignored) lets the caller gather from the parent instead.

    >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # uniform over 2 tokens
    >>> token_logprobs(logits, torch.tensor([[1, 0, 1]])).exp()
    tensor([[1.0000, 0.5000, 0.5000]])
    """
    if logits.dim() != 3 or logits.shape[:2] != token_ids.shape:
        raise ValueError(
            f"logits must be [B, T, V] over token_ids [B, T]; got logits {tuple(logits.shape)}, "
            f"token_ids {tuple(token_ids.shape)}"
        )
    batch, length, vocab = logits.shape
    targets = token_ids[:, 1:]  # [B, T-1]
    if predictor is None:
        scores = logits[:, :-1]  # [B, T-1, V]
    else:
        index = predictor[:, 1:]  # [B, T-1]
        later = torch.arange(1, length, device=index.device)  # [T-1]
        if predictor.shape != token_ids.shape or bool(((index < 0) | (index >= later)).any()):
            raise ValueError(
                f"predictor must be [B, T] = {tuple(token_ids.shape)} with 0 <= predictor[:, t] < t "
                f"for t >= 1; got shape {tuple(predictor.shape)}"
            )
        scores = logits.gather(1, index[..., None].expand(-1, -1, vocab))  # [B, T-1, V]
    # float32: log-probs of bf16 logits lose ~0.1 nats otherwise (DESIGN §10).
    scores = scores.float()
    picked = scores.gather(-1, targets[..., None]).squeeze(-1)  # [B, T-1]
    logp = picked - torch.logsumexp(scores, dim=-1)  # [B, T-1]
    return torch.cat([logp.new_zeros(batch, 1), logp], dim=1)  # [B, T]


def _token_mean(per_token: Tensor, loss_mask: Tensor, num_tokens: float | Tensor | None) -> Tensor:
    """Σ per_token · mask / num_tokens (num_tokens defaults to Σ mask)."""
    if loss_mask.shape != per_token.shape:
        raise ValueError(f"loss_mask must be {tuple(per_token.shape)}, got {tuple(loss_mask.shape)}")
    mask = loss_mask.to(per_token.dtype)  # [B, T]
    denominator = mask.sum() if num_tokens is None else num_tokens
    if float(denominator) <= 0:
        raise ValueError(f"the loss needs at least one token: num_tokens is {float(denominator)}")
    return (per_token * mask).sum() / denominator


def _per_token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-sequence advantages `[B]` to `[B, T]`; pass `[B, T]` through."""
    if advantages.shape == like.shape:
        return advantages.to(like.dtype)
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.to(like.dtype)[:, None].expand_as(like)  # [B, T]
    raise ValueError(
        f"advantages must be [B] or [B, T] with [B, T] = {tuple(like.shape)}, got {tuple(advantages.shape)}"
    )


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    predictor: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """Token-mean negative log-likelihood of `labels` `[B, T]` where `loss_mask` `[B, T]` is set.

    Causal and parallel SFT share it: the layout's mask and positions shape `logits` upstream; `predictor`
    is passed to `token_logprobs`.
    """
    return -_token_mean(token_logprobs(logits, labels, predictor), loss_mask, num_tokens)


def papo_loss(
    logprobs: Tensor, advantages: Tensor, loss_mask: Tensor, num_tokens: float | Tensor | None = None
) -> Tensor:
    """PAPO: −(1/Σ|y_i|) Σ_i Σ_t exp(logp_t − sg(logp_t)) · Â_i (DESIGN §5, stage 3).

    `logprobs` `[B, T]` are the current policy's (with grad), `advantages` `[B]` or `[B, T]`. The ratio is
    1 in value and ∇logp in gradient, so this is on-policy REINFORCE with a token-mean: no clipping, so
    structural tag tokens always get gradient.
    """
    ratio = torch.exp(logprobs - logprobs.detach())  # [B, T], all ones; d ratio = d logp
    return -_token_mean(ratio * _per_token_advantages(advantages, logprobs), loss_mask, num_tokens)


class PolicyLoss(NamedTuple):
    """A surrogate loss to backpropagate plus what to log about it."""

    loss: Tensor  # [] scalar
    clip_fraction: Tensor  # [] share of masked tokens whose gradient the clip removed (no grad)


def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip: bool = True,
    num_tokens: float | Tensor | None = None,
) -> PolicyLoss:
    """DAPO's clip-higher surrogate: −token-mean of min(r·Â, clip(r, 1 − eps_low, 1 + eps_high)·Â).

    r = exp(logprobs − old_logprobs) per token, `[B, T]`; `old_logprobs` are those of the policy that
    sampled (no grad). ε_low 0.2 and ε_high 0.28 are DAPO's (Yu et al. 2025). With `clip=False` the loss
    is the plain importance-weighted −r·Â, the clip-off ablation (DESIGN §5).
    """
    adv = _per_token_advantages(advantages, logprobs)  # [B, T]
    ratio = torch.exp(logprobs - old_logprobs.detach())  # [B, T]
    unclipped = ratio * adv  # [B, T]
    if clip:
        clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv  # [B, T]
        per_token = torch.minimum(unclipped, clipped)  # [B, T]
        # The min picked the clamped (constant) term: Â>0 above 1+ε_high or Â<0 below 1−ε_low.
        was_clipped = clipped < unclipped  # [B, T]
    else:
        per_token = unclipped
        was_clipped = torch.zeros_like(unclipped, dtype=torch.bool)
    loss = -_token_mean(per_token, loss_mask, num_tokens)
    mask = loss_mask.bool()
    clip_fraction = (was_clipped & mask).sum() / mask.sum().clamp(min=1)
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction.detach().float())


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    num_tokens: float,
    *,
    clip: bool,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> PolicyLoss:
    """The RL config's loss: DAPO's clipped surrogate when `clip`, else PAPO's (its clip fraction is 0)."""
    if clip:
        return dapo_loss(
            logprobs,
            old_logprobs,
            advantages,
            loss_mask,
            eps_low=eps_low,
            eps_high=eps_high,
            num_tokens=num_tokens,
        )
    return PolicyLoss(papo_loss(logprobs, advantages, loss_mask, num_tokens=num_tokens), torch.zeros(()))
