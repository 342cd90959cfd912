"""Stages 1 and 3: RL with DAPO (NPR-Zero), PAPO (NPR), and the sequential-RL baseline (DESIGN §5).

The recipe, top to bottom, for every step: take the step's prompts (a seeded shuffle of the data), decode
G rollouts of each with the engine (model in eval and inference mode), score them, gather every process's
scores, drop what must not be trained, compute advantages on the global batch, then run
`updates_per_batch` optimizer steps on this process's share, with log-probs from the layout's mask and
positions (`npr.train.sequences`, the trainer side of engine/trainer parity).

Which variant runs is decided by the config's fields; `algorithm` only picks their paper presets:
- `mode`: parallel rollouts (engine forks) or sequential ones. Parallel rollouts that the layout builder
  rejects (strict) or that hit the length limit are dropped: PAPO's structural filter. A sequential rollout
  always lays out and is judged by its reward instead.
- `format_reward`: stage 1's format + accuracy reward, else ±1 accuracy (`npr.rewards`).
- `dynamic_sampling`: drop groups whose rewards are all equal (DAPO). They are not replaced by fresh prompts,
  so the step trains on fewer rollouts.
- `advantage`: group_std, batch_std or mean (`npr.train.advantages`), computed once on what is trained.
- `clip`: DAPO's clipped surrogate against π_old; else PAPO's loss (ratio 1 in value, no clip, no IS).
  π_old is the policy before the step's first update, read off that update's own forward pass: the first
  ratio is exactly 1, later ones (`updates_per_batch` > 1) are not.

Seeded per rollout: prompt p of step s samples with `rollout_seed(seed, s, p)` (+ j for its j-th sample),
so a resumed run, or a run on any number of processes, samples the same rollouts as an unbroken single one.

Processes (`torchrun`): each one decodes its contiguous share of the step's prompts; the scores are
all-gathered, so filters and advantages (the batch std included) see the global batch, and the loss is a
token mean over the global batch. Processes keep different numbers of rollouts after filtering (some none),
so they run different numbers of forward/backward passes; DDP's hooks would expect the same number, so the
model is not wrapped and the accumulated gradients are averaged by one explicit all-reduce per update.

Run it with `npr train rl CONFIG`, `python -m npr.train.rl CONFIG`, or
`torchrun --nproc-per-node N -m npr.train.rl CONFIG`. A killed run restarted with the same command resumes
from its last checkpoint and ends with the same weights as an unbroken run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from npr.data import Example, build_prompt, load_dataset
from npr.engine import FinishReason, ParallelEngine, Rollout, SamplingParams
from npr.engine.params import LogitsProcessor
from npr.format import TagIds
from npr.layout import LayoutError, build_layout
from npr.rewards import AnswerCheck, format_penalty_batch, stage1_reward_batch, stage3_reward_batch
from npr.tasks import task_check
from npr.train.advantages import compute_advantages, dynamic_sampling_mask
from npr.train.config import RLConfig
from npr.train.loop import (
    MetricLogger,
    all_reduce_sum,
    build_optimizer,
    clip_gradients,
    device_for,
    finish_run,
    init_distributed,
    is_distributed,
    load_train_model,
    progress_bar,
    recipe_main,
    resume,
    save,
    seed_everything,
)
from npr.train.losses import PolicyLoss, dapo_loss, papo_loss
from npr.train.sequences import TrainExample, forward_logprobs, make_batch, rollout_example

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
    "time/step": "Seconds for the whole step.",
}

# ------------------------------------------------------------------------------------------------ sampling


def rollout_seed(seed: int, step: int, position: int) -> int:
    """Sampling seed of the prompt at `position` of step `step`'s global batch (its j-th sample adds j).

    A hash, so seeds of neighbouring prompts and steps do not overlap; below 2**62 so `+ j` stays a valid
    63-bit seed.
    """
    digest = hashlib.blake2b(f"{seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


@functools.lru_cache(maxsize=4)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_examples, generator=generator).tolist())


def step_prompts(n_examples: int, per_step: int, seed: int, step: int) -> list[int]:
    """Dataset indices of step `step`'s global batch: the next `per_step` of one seeded shuffle per epoch."""
    cursors = range(step * per_step, (step + 1) * per_step)
    return [_epoch_order(n_examples, seed, c // n_examples)[c % n_examples] for c in cursors]


def generate(
    engine: ParallelEngine,
    prompts: Sequence[list[int]],
    positions: Sequence[int],
    config: RLConfig,
    step: int,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Rollout]:
    """`rollouts_per_prompt` rollouts of each prompt, prompt-major; `Rollout.index` is its batch position."""
    requests = []
    for ids, position in zip(prompts, positions, strict=True):
        params = SamplingParams(
            n=config.rollouts_per_prompt,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=rollout_seed(config.seed, step, position),
            max_new_tokens=config.max_new_tokens,
            max_plans=config.max_plans,
            logits_processors=tuple(processors),
        )
        requests += engine.add_request(ids, params, config.mode, index=position)
    while engine.has_work:  # the engine is ours alone: everything it holds was queued above
        engine.step()
    return [engine.rollout(r) for r in requests]


# ------------------------------------------------------------------------------------------------ scoring


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
        return Scores(*_all_gather_rows(table).unbind(1))


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


# ------------------------------------------------------------------------------------------------ processes


def _all_gather_rows(table: Tensor) -> Tensor:
    """Every process's `[n, K]` rows (same n on each), concatenated in rank order: `[world · n, K]`."""
    if not is_distributed():
        return table
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    local = table.to(device) if device is not None else table
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(table.device)


def _average_gradients(model: torch.nn.Module) -> None:
    """Average the accumulated gradients over processes (one all-reduce per parameter, overlapped)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a process that kept no rollout still takes part
                p.grad = torch.zeros_like(p)
            handles.append((p.grad, dist.all_reduce(p.grad, async_op=True)))
    for grad, handle in handles:
        handle.wait()
        grad.div_(world)


class _Timer:
    """Seconds per phase; waits for the GPU at phase ends so that each phase is charged its own work."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] += time.perf_counter() - began


# ------------------------------------------------------------------------------------------------ update


def policy_loss(
    config: RLConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    num_tokens: float,
) -> PolicyLoss:
    """DAPO's clipped surrogate when `config.clip`, else PAPO's loss (its clip fraction is 0)."""
    if config.clip:
        return dapo_loss(
            logprobs,
            old_logprobs,
            advantages,
            loss_mask,
            eps_low=config.eps_low,
            eps_high=config.eps_high,
            num_tokens=num_tokens,
        )
    loss = papo_loss(logprobs, advantages, loss_mask, num_tokens=num_tokens)
    return PolicyLoss(loss, torch.zeros(()))


def update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[list[TrainExample], Tensor]],
    config: RLConfig,
    tags: TagIds,
    pad_id: int,
    tokens: float,
    timer: _Timer,
) -> dict[str, float]:
    """`updates_per_batch` optimizer steps on this process's `(examples, advantages [b])` micro-batches.

    The loss is a token mean over the global batch of `tokens` loss tokens: each process divides by its
    share, `tokens / world`, and the gradient average over processes restores Σ / tokens. A micro-batch is
    laid out when it is used, so only one `[b, 1, L, L]` mask is alive at a time. Returns the `train/*`
    metrics, averaged over the updates.
    """
    world = dist.get_world_size() if is_distributed() else 1
    device = next(model.parameters()).device
    old: list[Tensor] = []  # π_old per micro-batch: the policy before the first update
    totals: dict[str, float] = defaultdict(float)
    for step in range(config.updates_per_batch):
        loss = clipped = 0.0
        for j, (examples, advantages) in enumerate(micro_batches):
            with timer("logprob"):
                batch = make_batch(examples, tags, pad_id, dtype=model.dtype).to(device)
                logprobs = forward_logprobs(model, batch)  # [b, L]
            with timer("update"):
                if step == 0:
                    old.append(logprobs.detach())
                    gap = (logprobs.detach() - batch.old_logprobs).abs() * batch.loss_mask  # [b, L]
                    totals["train/logprob_gap"] += float(gap.sum())
                out = policy_loss(
                    config, logprobs, old[j], advantages.to(device), batch.loss_mask, tokens / world
                )
                out.loss.backward()
                loss += out.loss.item()
                clipped += float(out.clip_fraction) * batch.num_tokens
        with timer("update"):
            _average_gradients(model)
            totals["train/grad_norm"] += clip_gradients(model, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        totals["train/loss"] += all_reduce_sum(loss) / world
        totals["train/clip_fraction"] += all_reduce_sum(clipped) / tokens
    metrics = {k: v / config.updates_per_batch for k, v in totals.items() if k != "train/logprob_gap"}
    metrics["train/logprob_gap"] = all_reduce_sum(totals["train/logprob_gap"]) / tokens
    return metrics


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


def _check_resumable(saved: dict[str, int], now: dict[str, int], where: Path) -> None:
    for key in ("prompts_per_step", "examples"):
        if saved.get(key) != now[key]:
            raise ValueError(
                f"{where}: cannot resume: the checkpoint's {key} is {saved.get(key)}, this run's is "
                f"{now[key]} (same data and prompts_per_step needed)"
            )


# ------------------------------------------------------------------------------------------------ recipe


def train(
    config: RLConfig,
    *,
    check: AnswerCheck | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Path:
    """Run (or resume) RL as `config` says; returns the final checkpoint folder.

    `check` replaces the math verifier (see `score`); `logits_processors` go to every rollout's sampling.
    """
    rank, world = init_distributed()
    if config.prompts_per_step % world:
        raise ValueError(
            f"prompts_per_step ({config.prompts_per_step}) must be divisible by the number of processes "
            f"({world}): each decodes an equal share"
        )
    device = device_for(rank)
    seed_everything(config.seed)
    model, tokenizer = load_train_model(config.model_path, config.dtype, device)
    tags = TagIds.from_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = load_dataset(config.data)
    # The format instruction unless the run neither forks nor rewards the format (the sequential baseline).
    with_format = config.mode == "parallel" or config.format_reward
    prompt_ids = functools.cache(
        lambda i: build_prompt(tokenizer, data[i].question, parallel=with_format, style=config.prompt_style)
    )
    check = check or task_check(data)  # our own tasks bring a verifier that checks intermediate results

    optimizer = build_optimizer(model, config)
    state = resume(config.out_dir, model, optimizer, None)  # constant lr: no scheduler

    def position(step: int) -> dict[str, int]:
        return {"step": step, "prompts_per_step": config.prompts_per_step, "examples": len(data)}

    start = 0
    if state is not None:
        _check_resumable(state.data_position, position(0), state.path)
        start = state.step
    engine = ParallelEngine(model, tokenizer)
    share = config.prompts_per_step // world  # prompts decoded by this process, positions mine
    mine = range(rank * share, (rank + 1) * share)
    rows = slice(mine.start * config.rollouts_per_prompt, mine.stop * config.rollouts_per_prompt)

    def checkpoint(step: int) -> None:
        save(
            config.out_dir,
            model,
            tokenizer,
            optimizer,
            None,
            step,
            position(step),
            config,
            rank=rank,
            keep_last=config.keep_last,
        )

    bar = progress_bar(config.max_steps, start, rank, f"rl ({config.algorithm}, {config.mode})")
    with MetricLogger(config.out_dir, rank, start) as log:
        for step in range(start, config.max_steps):
            timer = _Timer()
            with timer("step"):
                # 1. Rollouts of this process's share of the step's prompts.
                indices = step_prompts(len(data), config.prompts_per_step, config.seed, step)
                with timer("rollout"):
                    model.eval()
                    prompts = [prompt_ids(indices[p]) for p in mine]
                    rollouts = generate(engine, prompts, mine, config, step, logits_processors)
                    model.train()

                # 2. Scores of the global batch: what is trained, with which advantage.
                with timer("scoring"):
                    problems = [data[indices[r.index]] for r in rollouts]
                    scores = score(rollouts, problems, config, tags, check).gather()
                    keep, advantages, dropped_constant = select(scores, config)

                # 3. This process's kept rollouts in micro-batches; the updates.
                kept = keep[rows].nonzero().flatten().tolist()
                size = config.micro_batch_size
                chunks = [kept[i : i + size] for i in range(0, len(kept), size)]
                micro_batches = [
                    ([rollout_example(rollouts[i]) for i in c], advantages[rows][c].float()) for c in chunks
                ]
                tokens = all_reduce_sum(sum(sum(e.loss_mask) for m, _ in micro_batches for e in m))
                trained: dict[str, float] = {}
                if tokens:
                    trained = update(model, optimizer, micro_batches, config, tags, pad_id, tokens, timer)

            # 4. Metrics of the global batch, checkpoint.
            done = step + 1
            metrics = batch_metrics(scores, keep, dropped_constant, tokens)
            metrics |= {
                "train/updates": float(config.updates_per_batch if trained else 0),
                "train/lr": config.lr,
            }
            metrics |= trained
            metrics |= {f"time/{phase}": seconds for phase, seconds in timer.seconds.items()}
            if done % config.log_every == 0 or done == config.max_steps:
                log.log(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kept=int(metrics["rollout/kept"]))
            bar.update(1)
            if config.save_every and done % config.save_every == 0 and done < config.max_steps:
                checkpoint(done)
        bar.close()
    return finish_run(checkpoint, start, config.max_steps, config.out_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m npr.train.rl CONFIG` (also what `torchrun … -m npr.train.rl CONFIG` runs)."""
    recipe_main(train, RLConfig, "npr.train.rl", argv)


if __name__ == "__main__":
    main()
