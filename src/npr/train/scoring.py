"""Scoring a step's rollouts for RL: rewards, the structural filter, selection and advantages, metrics.

The RL recipe (`npr.train.rl`) calls `score` on its own rollouts, gathers the `Scores` of every process,
then `select`s what is trained on the global batch (DESIGN §5): parallel rollouts that the layout builder
rejects (strict) or that hit the length limit are dropped (PAPO's structural filter), dynamic sampling
drops constant groups, and advantages are computed once on what is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from npr.data import Example
from npr.engine import FinishReason, Rollout
from npr.format import TagIds
from npr.layout import LayoutError, build_layout
from npr.rewards import AnswerCheck, format_penalty_batch, stage1_reward_batch, stage3_reward_batch
from npr.train.advantages import compute_advantages, dynamic_sampling_mask
from npr.train.config import RLConfig
from npr.train.distributed import all_gather_rows

METRICS: dict[str, str] = {
    "reward/mean": "Mean reward of all rollouts of the step (before any filter).",
    "reward/std": "Standard deviation of those rewards.",
    "reward/accuracy": "Share of rollouts with reward +1: correct (and, under the format reward, well formed).",
    "rollout/format_valid": "Share of rollouts whose text has format penalty 0 (DESIGN §2).",
    "rollout/parallel_rate": "Share of rollouts with at least one real fork.",
    "rollout/kept": "Rollouts trained on, over all processes.",
    "filtered/malformed": "Parallel rollouts dropped because the layout builder (strict) rejects them.",
    "filtered/length": "Parallel rollouts dropped because they hit the length limit (length or budget).",
    "filtered/constant_group": "Rollouts dropped by dynamic sampling (their group's rewards are all equal).",
    "tokens/total": "Mean generated tokens per rollout, every branch counted.",
    "tokens/critical_path": "Mean critical-path tokens per rollout (the sequential depth).",
    "tokens/trained": "Loss tokens of the global batch (sampled tokens of kept rollouts).",
    "train/updates": "Optimizer steps taken on this batch: updates_per_batch, or 0 when nothing was kept.",
    "train/loss": "Surrogate loss, mean over the updates (only when an update ran, as the four below).",
    "train/clip_fraction": "Share of trained tokens whose gradient the clip removed, mean over updates.",
    "train/grad_norm": "Global gradient norm before clipping, mean over the updates.",
    "train/logprob_gap": "Mean |trainer log-prob − engine log-prob| over trained tokens (parity check).",
    "train/lr": "Learning rate.",
    "time/rollout": "Seconds decoding rollouts with the engine (this process).",
    "time/scoring": "Seconds scoring, gathering, filtering and computing advantages.",
    "time/logprob": "Seconds in the trainer's forward passes (log-probs with the layout).",
    "time/update": "Seconds in backward passes, gradient averaging, clipping and optimizer steps.",
    "time/sync": "Seconds loading the new weights into the rollout engine (backend vllm).",
    "time/step": "Seconds for the whole step.",
}


@dataclass(frozen=True)
class Scores:
    """Per-rollout numbers, `[N]` float64 each, in rollout order; `gather` joins every process's rows."""

    group: Tensor  # position of the rollout's prompt in the step's global batch
    reward: Tensor
    malformed: Tensor  # 1: a parallel rollout the layout builder rejects
    cut: Tensor  # 1: a parallel rollout that hit the length limit
    format_valid: Tensor
    parallel: Tensor
    total_tokens: Tensor
    critical_path: Tensor

    def gather(self) -> Scores:
        table = torch.stack([getattr(self, f.name) for f in fields(self)], dim=1)  # [N, K]
        return Scores(*all_gather_rows(table).unbind(1))


def _structure(rollout: Rollout, tags: TagIds) -> tuple[bool, bool]:
    """(malformed, cut) of one rollout; sequential rollouts are neither (DESIGN §5, stage 3)."""
    if rollout.mode != "parallel":
        return False, False
    if rollout.finish_reason in (FinishReason.LENGTH, FinishReason.BUDGET):
        return False, True
    if rollout.finish_reason != FinishReason.STOP:  # invalid_fork / invalid_structure
        return True, False
    try:
        build_layout(rollout.prompt_ids + rollout.token_ids, tags, len(rollout.prompt_ids), strict=True)
    except LayoutError:
        return True, False
    return False, False


def score(
    rollouts: Sequence[Rollout],
    examples: Sequence[Example],
    config: RLConfig,
    tags: TagIds,
    check: AnswerCheck | None = None,
) -> Scores:
    """Rewards and statistics of `rollouts`; `examples[i]` is the problem of rollout i.

    `check(response_text, example)` replaces the math verifier (a task's own, e.g. one that also checks
    intermediate results).
    """
    texts = [r.text for r in rollouts]
    reward_fn = stage1_reward_batch if config.format_reward else stage3_reward_batch
    rewards = reward_fn(texts, list(examples), check=check)
    structure = [_structure(r, tags) for r in rollouts]

    def column(values: Sequence[float | int | bool]) -> Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float64)

    return Scores(
        group=column([r.index for r in rollouts]),
        reward=column(rewards),
        malformed=column([m for m, _ in structure]),
        cut=column([c for _, c in structure]),
        format_valid=column([p == 0.0 for p in format_penalty_batch(texts)]),
        parallel=column([r.is_parallel for r in rollouts]),
        total_tokens=column([r.stats.total_tokens for r in rollouts]),
        critical_path=column([r.stats.critical_path_tokens for r in rollouts]),
    )


def select(scores: Scores, config: RLConfig) -> tuple[Tensor, Tensor, int]:
    """Which rollouts of the global batch are trained, `[N]` bool; their advantages, `[N]` (0 elsewhere);
    and how many dynamic sampling dropped."""
    keep = (scores.malformed == 0) & (scores.cut == 0)  # [N]
    dropped_constant = 0
    if config.dynamic_sampling and keep.any():
        varied = torch.zeros_like(keep)
        varied[keep] = dynamic_sampling_mask(scores.reward[keep], scores.group[keep])
        dropped_constant = int((keep & ~varied).sum())
        keep &= varied
    advantages = torch.zeros_like(scores.reward)
    if keep.any():
        advantages[keep] = compute_advantages(scores.reward[keep], scores.group[keep], config.advantage)
    return keep, advantages, dropped_constant


def batch_metrics(scores: Scores, keep: Tensor, dropped_constant: int, tokens: float) -> dict[str, float]:
    """The `reward/`, `rollout/`, `filtered/` and `tokens/` metrics of the global batch."""
    return {
        "reward/mean": float(scores.reward.mean()),
        "reward/std": float(scores.reward.std()) if len(scores.reward) > 1 else 0.0,
        "reward/accuracy": float((scores.reward == 1).double().mean()),
        "rollout/format_valid": float(scores.format_valid.mean()),
        "rollout/parallel_rate": float(scores.parallel.mean()),
        "rollout/kept": float(keep.sum()),
        "filtered/malformed": float(scores.malformed.sum()),
        "filtered/length": float(scores.cut.sum()),
        "filtered/constant_group": float(dropped_constant),
        "tokens/total": float(scores.total_tokens.mean()),
        "tokens/critical_path": float(scores.critical_path.mean()),
        "tokens/trained": tokens,
    }
