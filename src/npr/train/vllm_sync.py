"""RL rollouts on vLLM, colocated: the trainer stays in PyTorch, vLLM decodes in the same process (DESIGN §4.1).

Three pieces the RL recipe calls: `rollout_engine` builds the engine its config names, `sync_weights` loads
the trainer's weights into vLLM after the step's optimizer updates (so the next rollouts come from the
updated policy), and `tis_weights` gives truncated importance sampling's per-token weights when the
sampler's log-probs are not the trainer's (the train/inference mismatch, logged as `train/logprob_gap`):
w_t = min(exp(logp_old_t − logp_sampler_t), cap) multiplies each token's advantage. Every surrogate here is
linear in the advantage and w_t > 0, so scaling advantages is the same as weighting each token's loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from npr.engine import Engine, ParallelEngine
from npr.train.distributed import is_distributed


def rollout_engine(model: Any, tokenizer: Any, backend: str) -> Engine:
    """The rollout engine: our hf engine on the trainer's own model, or vLLM on a copy of its weights."""
    if backend == "hf":
        return ParallelEngine(model, tokenizer)
    if backend == "vllm":
        from npr.engine.vllm import load_vllm

        if is_distributed():
            raise ValueError("backend vllm runs RL on one process (colocated); use backend hf under torchrun")

        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return load_vllm(model, tokenizer=tokenizer, dtype=dtype)
    raise ValueError(f"RL rollouts run on backend 'hf' or 'vllm', got {backend!r}")


def sync_weights(engine: Engine, model: torch.nn.Module) -> None:
    """Load the trainer's current weights into a vLLM engine; the hf engine shares the model already."""
    if engine.backend == "vllm":
        engine.load_weights(model.state_dict().items())  # type: ignore[attr-defined]


def tis_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, loss_mask: Tensor, cap: float) -> Tensor:
    """Per-token weights `[B, T]`: min(exp(old − sampler), cap) on trained tokens, 1 elsewhere (no grad).

    `old_logprobs` `[B, T]` are the trainer's π_old, `sampler_logprobs` `[B, T]` the engine's for the same
    tokens, `loss_mask` `[B, T]`. Multiply the per-token advantages by them.

    >>> tis_weights(torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[1, 0]]), 2.0)
    tensor([[2., 1.]])
    """
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    weight = torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()  # [B, T]
    return torch.where(loss_mask.bool(), weight, torch.ones_like(weight))
