"""Advantages from per-rollout rewards, and DAPO's dynamic-sampling filter (DESIGN §5).

Rewards are a flat `[N]` tensor; `groups` says which rollouts answer the same prompt: either a group
size (rollouts of one prompt are contiguous and every group has that size) or `[N]` group ids (any
values, groups may differ in size: PAPO drops malformed rollouts, which leaves groups uneven).

Standard deviations use Bessel's correction (`torch.std`'s default, as GRPO/DAPO implementations do); a
group of one has standard deviation 0 and advantage 0.

>>> rewards = torch.tensor([1.0, -1.0, 1.0, 1.0])  # two prompts, two rollouts each
>>> group_normalized(rewards, 2)  # (R - mean) / std of the group: std of (1, -1) is sqrt(2)
tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
>>> batch_std_normalized(rewards, 2)  # std of all four rewards is 1
tensor([ 1.0000, -1.0000,  0.0000,  0.0000])
>>> dynamic_sampling_mask(rewards, 2)
tensor([ True,  True, False, False])
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

AdvantageKind = Literal["group_std", "batch_std", "mean"]
ADVANTAGE_KINDS: tuple[str, ...] = get_args(AdvantageKind)


def _group_index(rewards: Tensor, groups: int | Tensor) -> tuple[Tensor, int]:
    """Each reward's group as 0..G−1, `[N]`, and G."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [N] tensor, got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if isinstance(groups, int):
        if groups < 1 or n % groups:
            raise ValueError(f"{n} rewards do not split into groups of size {groups}")
        return torch.arange(n, device=rewards.device) // groups, n // groups
    if groups.shape != rewards.shape:
        raise ValueError(f"group ids must be [N] = {tuple(rewards.shape)}, got {tuple(groups.shape)}")
    unique, index = torch.unique(groups, return_inverse=True)
    return index.to(rewards.device), unique.numel()


def _as_float(rewards: Tensor) -> Tensor:
    return rewards if rewards.is_floating_point() else rewards.float()


def _group_sum(values: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """Σ of `values` `[N]` per group, `[G]`."""
    return values.new_zeros(n_groups).index_add_(0, index, values)


def _group_mean(rewards: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """Each reward's group mean, `[N]`."""
    counts = _group_sum(torch.ones_like(rewards), index, n_groups)  # [G]
    return (_group_sum(rewards, index, n_groups) / counts)[index]


def _std(deviations: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """Bessel-corrected std per group from deviations to the group mean, `[N]`; 0 for a group of one."""
    counts = _group_sum(torch.ones_like(deviations), index, n_groups)  # [G]
    variance = _group_sum(deviations**2, index, n_groups) / (counts - 1).clamp(min=1)  # [G]
    return variance.sqrt()[index]


def mean_centered(rewards: Tensor, groups: int | Tensor) -> Tensor:
    """Â = R − mean of its group, `[N]` (Dr. GRPO-style: no scaling)."""
    rewards = _as_float(rewards)
    index, n_groups = _group_index(rewards, groups)
    return rewards - _group_mean(rewards, index, n_groups)


def group_normalized(rewards: Tensor, groups: int | Tensor, eps: float = 1e-6) -> Tensor:
    """Â = (R − group mean) / (group std + eps), `[N]`: GRPO/DAPO's advantage (DESIGN §5, stage 1)."""
    rewards = _as_float(rewards)
    index, n_groups = _group_index(rewards, groups)
    centered = rewards - _group_mean(rewards, index, n_groups)  # [N]
    return centered / (_std(centered, index, n_groups) + eps)


def batch_std_normalized(rewards: Tensor, groups: int | Tensor, eps: float = 1e-6) -> Tensor:
    """Â = (R − group mean) / (std of all rewards in the batch + eps), `[N]`: PAPO's (DESIGN §5, stage 3).

    The std is computed once over the whole batch, so every group is scaled alike and a group whose
    rewards barely differ is not blown up. Under DDP, call it on the gathered global batch.
    """
    rewards = _as_float(rewards)
    index, n_groups = _group_index(rewards, groups)
    batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())  # [] once per batch
    return (rewards - _group_mean(rewards, index, n_groups)) / (batch_std + eps)


def compute_advantages(rewards: Tensor, groups: int | Tensor, kind: AdvantageKind) -> Tensor:
    """The advantage named by `kind` (config field `advantage`), `[N]`."""
    if kind == "group_std":
        return group_normalized(rewards, groups)
    if kind == "batch_std":
        return batch_std_normalized(rewards, groups)
    if kind == "mean":
        return mean_centered(rewards, groups)
    raise ValueError(f"advantage kind must be one of {ADVANTAGE_KINDS}, got {kind!r}")


def dynamic_sampling_mask(rewards: Tensor, groups: int | Tensor) -> Tensor:
    """`[N]` bool: True for rollouts whose group has at least two different rewards (DAPO).

    A group whose rewards are all equal has zero advantage everywhere and only dilutes the token mean;
    DAPO drops it and samples more prompts.
    """
    rewards = _as_float(rewards)
    index, n_groups = _group_index(rewards, groups)
    high = rewards.new_zeros(n_groups).scatter_reduce(0, index, rewards, "amax", include_self=False)
    low = rewards.new_zeros(n_groups).scatter_reduce(0, index, rewards, "amin", include_self=False)
    return (high > low)[index]
