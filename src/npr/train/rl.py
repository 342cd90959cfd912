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
Under `distributed: fsdp` the model is sharded (FSDP2): every process runs as many passes as the busiest
one (zero-gradient padding passes), FSDP averages the gradients, and the engine decodes with a whole copy
of the model that is loaded with the trained weights before each step's rollouts.

Kept rollouts are packed into rows of `max_tokens_per_row` tokens (`packing`, the default; advantages
spread over each rollout's tokens), else padded in micro-batches of `micro_batch_size`; scoring,
selection and the metrics live in `npr.train.scoring`.

Run it with `npr train rl CONFIG`, `python -m npr.train.rl CONFIG`, or
`torchrun --nproc-per-node N -m npr.train.rl CONFIG`. A killed run restarted with the same command resumes
from its last checkpoint and ends with the same weights as an unbroken run.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from npr.attention import Kernel
from npr.data import build_prompt, load_dataset
from npr.engine import (
    Engine,
    Rollout,
    SamplingParams,
    add_requests,
    run_to_completion,
)
from npr.engine.params import LogitsProcessor
from npr.format import TagIds
from npr.rewards import AnswerCheck
from npr.tasks import task_check
from npr.train.config import RLConfig
from npr.train.distributed import (
    Timer,
    all_reduce_sum,
    average_gradients,
    device_for,
    dummy_backward,
    equal_micro_batches,
    full_model_state,
    init_distributed,
    is_sharded,
    load_full_state,
    world_size,
)
from npr.train.loop import (
    MetricLogger,
    autocast,
    build_optimizer,
    clip_gradients,
    finish_run,
    load_train_model,
    prepare_model,
    progress_bar,
    recipe_main,
    resume,
    save,
    seed_everything,
)
from npr.train.losses import policy_loss
from npr.train.packing import local_rows, plan_micro_batches
from npr.train.scoring import batch_metrics, score, select
from npr.train.sequences import (
    TrainExample,
    compute_dtype,
    forward_logprobs,
    make_batch,
    rollout_example,
)
from npr.train.vllm_sync import rollout_engine, sync_weights, tis_weights

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
    engine: Engine,
    prompts: Sequence[list[int]],
    positions: Sequence[int],
    config: RLConfig,
    step: int,
    processors: Sequence[LogitsProcessor] = (),
) -> list[Rollout]:
    """`rollouts_per_prompt` rollouts of each prompt, prompt-major; `Rollout.index` is its batch position."""
    params = [
        SamplingParams(
            n=config.rollouts_per_prompt,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=rollout_seed(config.seed, step, position),
            max_new_tokens=config.max_new_tokens,
            max_plans=config.max_plans,
            logits_processors=tuple(processors),
        )
        for position in positions
    ]
    return run_to_completion(engine, add_requests(engine, prompts, params, config.mode, indices=positions))


# ------------------------------------------------------------------------------------------------ update


@dataclass(frozen=True)
class Forward:
    """How the update runs its forward passes: kernel, compute precision, packing."""

    attention: Kernel
    config: RLConfig
    device: torch.device

    def passes(self, examples: Sequence[TrainExample]) -> list[list[list[int]]]:
        """Micro-batches (rows of example indices) over `examples`: packed rows of `max_tokens_per_row`
        (null: the longest sequence), or `micro_batch_size` padded rollouts per pass."""
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
        capacity = self.config.max_tokens_per_row or max(lengths, default=1)
        return plan_micro_batches(
            lengths,
            packing=self.config.packing,
            capacity=capacity,
            rows_per_batch=max(1, self.config.micro_batch_tokens // capacity),
            batch_size=self.config.micro_batch_size,
        )


def update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[TrainExample],
    advantages: Tensor,
    forward: Forward,
    tags: TagIds,
    pad_id: int,
    tokens: float,
    timer: Timer,
) -> dict[str, float]:
    """`updates_per_batch` optimizer steps on this process's kept `examples` with `advantages` `[N]`.

    The loss is a token mean over the global batch of `tokens` loss tokens: each process divides by its
    share, `tokens / world`, and the gradient average over processes restores Σ / tokens. A micro-batch is
    laid out when it is used, so only one micro-batch's mask is alive at a time. Returns the `train/*`
    metrics, averaged over the updates.
    """
    config, device = forward.config, forward.device
    world = world_size()
    passes = forward.passes(examples)
    count = equal_micro_batches(len(passes), model)  # FSDP: every process runs as many passes
    with autocast(config, device):
        mask_dtype = compute_dtype(model, device)
    old: list[Tensor] = []  # π_old per micro-batch: the policy before the first update
    totals: dict[str, float] = defaultdict(float)
    for step in range(config.updates_per_batch):
        loss = clipped = 0.0
        for j in range(count):
            if j >= len(passes):
                dummy_backward(model, device)
                continue
            flat, rows = local_rows(passes[j])
            with timer("logprob"):
                batch = make_batch([examples[i] for i in flat], tags, pad_id, dtype=mask_dtype, rows=rows).to(
                    device
                )
                with autocast(config, device):
                    logprobs = forward_logprobs(model, batch, forward.attention)  # [b, L] float32
            with timer("update"):
                if step == 0:
                    old.append(logprobs.detach())
                    gap = (logprobs.detach() - batch.old_logprobs).abs() * batch.loss_mask  # [b, L]
                    totals["train/logprob_gap"] += float(gap.sum())
                adv = batch.per_token(advantages[flat])  # [b, L]
                if config.tis_cap is not None:  # weights of the sampler mismatch, per token
                    adv = adv * tis_weights(old[j], batch.old_logprobs, batch.loss_mask, config.tis_cap)
                out = policy_loss(
                    logprobs,
                    old[j],
                    adv,
                    batch.loss_mask,
                    tokens / world,
                    clip=config.clip,
                    eps_low=config.eps_low,
                    eps_high=config.eps_high,
                )
                out.loss.backward()
                loss += out.loss.item()
                clipped += float(out.clip_fraction) * batch.num_tokens
        with timer("update"):
            if not is_sharded(model):  # FSDP reduced the gradients in backward
                average_gradients(model)
            totals["train/grad_norm"] += clip_gradients(model, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        totals["train/loss"] += all_reduce_sum(loss) / world
        totals["train/clip_fraction"] += all_reduce_sum(clipped) / tokens
    metrics = {k: v / config.updates_per_batch for k, v in totals.items() if k != "train/logprob_gap"}
    metrics["train/logprob_gap"] = all_reduce_sum(totals["train/logprob_gap"]) / tokens
    return metrics


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
    model, tokenizer, attention = prepare_model(config, device, ddp=False)
    # A sharded model cannot decode alone (its gathers need every process in step): the engine gets a
    # whole copy, loaded with the trained weights before each step's rollouts.
    decoder = load_train_model(config.model_path, config.dtype, device)[0] if is_sharded(model) else model
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
    engine = rollout_engine(decoder, tokenizer, config.backend)
    forward = Forward(attention, config, device)
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
            timer = Timer()
            with timer("step"):
                # 1. Rollouts of this process's share of the step's prompts.
                indices = step_prompts(len(data), config.prompts_per_step, config.seed, step)
                with timer("rollout"):
                    if decoder is not model:
                        load_full_state(decoder, full_model_state(model, everywhere=True))
                    decoder.eval()
                    prompts = [prompt_ids(indices[p]) for p in mine]
                    rollouts = generate(engine, prompts, mine, config, step, logits_processors)
                    decoder.train()

                # 2. Scores of the global batch: what is trained, with which advantage.
                with timer("scoring"):
                    problems = [data[indices[r.index]] for r in rollouts]
                    scores = score(rollouts, problems, config, tags, check).gather()
                    keep, advantages, dropped_constant = select(scores, config)

                # 3. This process's kept rollouts, in micro-batches; the updates.
                kept = keep[rows].nonzero().flatten().tolist()
                examples = [rollout_example(rollouts[i]) for i in kept]
                tokens = all_reduce_sum(sum(sum(e.loss_mask) for e in examples))
                trained: dict[str, float] = {}
                if tokens:
                    mine_adv = advantages[rows][kept].float()
                    trained = update(
                        model, optimizer, examples, mine_adv, forward, tags, pad_id, tokens, timer
                    )
                    with timer("sync"):
                        sync_weights(engine, model)  # vLLM decodes the next step with the new weights

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
