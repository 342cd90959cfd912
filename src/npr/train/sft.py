"""Stage 2 (NPR-Beta): supervised fine-tuning on accepted trajectories, parallel or sequential (DESIGN §5).

The recipe, top to bottom: read the JSONL of accepted samples (`npr sample` writes it: `question`,
`response`, optionally `prompt_ids`), tokenise each into prompt + canonical response ids, then per
optimizer step take the next global batch of a seeded shuffle, split it over processes and micro-batches,
and minimise the token-mean NLL of the response tokens. Parallel SFT runs the forward with the layout's
attention mask and position ids (branches blind to their siblings); the sequential baseline trains the same
tokens causally.

Run it with `npr train sft CONFIG`, `python -m npr.train.sft CONFIG`, or on several processes with
`torchrun --nproc-per-node N -m npr.train.sft CONFIG`. A killed run restarted with the same command
resumes from its last checkpoint and ends with the same weights as an unbroken run.

Batches: every optimizer step consumes `batch_size × grad_accum × world` sequences; the last incomplete
global batch of each epoch is skipped (as `drop_last`), so every step draws the same number of sequences on
every process. With `packing` (the default) a process's share of the step is packed into rows of
`max_tokens_per_row` tokens and run in forward passes of `micro_batch_tokens`; without it, in `grad_accum`
passes of `batch_size` padded sequences. Either way the loss is the token mean of the step.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npr.data import DataError, PromptStyle, build_prompt, iter_jsonl
from npr.format import FormatError, TagIds
from npr.train.config import ConfigError, SFTConfig
from npr.train.distributed import (
    all_reduce_sum,
    device_for,
    dummy_backward,
    equal_micro_batches,
    grad_sync,
    init_distributed,
)
from npr.train.loop import (
    MetricLogger,
    autocast,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    finish_run,
    prepare_model,
    progress_bar,
    recipe_main,
    resume,
    save,
    seed_everything,
)
from npr.train.losses import sft_loss
from npr.train.packing import local_rows, plan_micro_batches
from npr.train.sequences import (
    TrainExample,
    compute_dtype,
    encode_response,
    layout_forward,
    make_batch,
    sft_example,
)

# ------------------------------------------------------------------------------------------------ data


def _response_ids(tokenizer: Any, text: str, parallel: bool, where: str) -> list[int]:
    """Canonical ids of a formatted response, so parallel and sequential SFT train the same tokens.

    A response outside the format is an error for parallel SFT and trained as written for sequential SFT.
    """
    try:
        return encode_response(tokenizer, text, parallel=True)
    except FormatError as exc:
        if parallel:
            raise DataError(f"{where}: response is not in the parallel format ({exc})") from None
        return encode_response(tokenizer, text, parallel=False)


def _prompt_ids(
    tokenizer: Any, record: dict[str, Any], parallel: bool, style: PromptStyle, where: str
) -> list[int]:
    """The record's own `prompt_ids` if given, else the chat prompt with the mode's instruction."""
    given = record.get("prompt_ids")
    if given is None:
        return build_prompt(tokenizer, record["question"], parallel=parallel, style=style)
    if not isinstance(given, list) or not given or not all(isinstance(i, int) for i in given):
        raise DataError(f"{where}: prompt_ids must be a non-empty list of token ids, got {given!r}")
    return given


def load_sft_examples(
    path: str | Path, tokenizer: Any, *, parallel: bool, max_len: int, style: PromptStyle = "full"
) -> tuple[list[TrainExample], int]:
    """Training examples from a JSONL of `{question, response, prompt_ids?}`; and how many were too long.

    Examples longer than `max_len` tokens are dropped, never cut: a cut branch breaks the layout.
    """
    examples, too_long = [], 0
    for _, where, record in iter_jsonl(path):
        for name in ("question", "response"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                raise DataError(f"{where}: field {name!r} must be a non-empty string")
        prompt = _prompt_ids(tokenizer, record, parallel, style, where)
        response = _response_ids(tokenizer, record["response"], parallel, where)
        if len(prompt) + len(response) > max_len:
            too_long += 1
            continue
        examples.append(sft_example(prompt, response, parallel=parallel))
    return examples, too_long


@dataclass(frozen=True)
class Plan:
    """How the data turn into optimizer steps; fixed by the config, the data and the number of processes."""

    examples: int
    global_batch: int  # sequences per optimizer step over all processes
    steps_per_epoch: int
    total_steps: int

    def position(self, step: int) -> dict[str, int]:
        """The data position after `step` optimizer steps, as saved in checkpoints."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch": batch, "global_batch": self.global_batch, "examples": self.examples}


def plan_steps(config: SFTConfig, examples: int, world: int) -> Plan:
    global_batch = config.batch_size * config.grad_accum * world
    steps_per_epoch = examples // global_batch
    if steps_per_epoch == 0:
        raise DataError(
            f"{config.data_path}: {examples} usable examples are fewer than one global batch of "
            f"{global_batch} (batch_size {config.batch_size} × grad_accum {config.grad_accum} × {world} "
            "processes)"
        )
    total = steps_per_epoch * config.epochs
    return Plan(examples, global_batch, steps_per_epoch, min(total, config.max_steps or total))


def micro_batches(
    plan: Plan, seed: int, step: int, rank: int, world: int, grad_accum: int
) -> list[list[int]]:
    """Example indices of each micro-batch this process runs at optimizer step `step`.

    The order is a permutation per epoch from `seed`, so a resumed run draws exactly what an unbroken one
    would. The step's global batch is cut into one contiguous share per process, then into micro-batches.
    """
    epoch, batch = divmod(step, plan.steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(plan.examples, generator=generator).tolist()
    share = plan.global_batch // world
    start = batch * plan.global_batch + rank * share
    mine = order[start : start + share]
    size = share // grad_accum
    return [mine[i * size : (i + 1) * size] for i in range(grad_accum)]


def _check_resumable(saved: dict[str, int], plan: Plan, where: Path) -> None:
    now = plan.position(0)
    for key in ("global_batch", "examples"):
        if saved.get(key) != now[key]:
            raise ConfigError(
                f"{where}: cannot resume: the checkpoint's {key} is {saved.get(key)}, this run's is {now[key]} "
                "(same data, batch_size × grad_accum × processes needed)"
            )


# ------------------------------------------------------------------------------------------------ recipe


def train(config: SFTConfig) -> Path:
    """Run (or resume) SFT as `config` says; returns the final checkpoint folder."""
    rank, world = init_distributed()
    device = device_for(rank)
    seed_everything(config.seed)
    model, tokenizer, attention = prepare_model(config, device)
    tags = TagIds.from_tokenizer(tokenizer)
    examples, too_long = load_sft_examples(
        config.data_path,
        tokenizer,
        parallel=config.parallel,
        max_len=config.max_len,
        style=config.prompt_style,
    )
    plan = plan_steps(config, len(examples), world)
    if rank == 0 and too_long:
        print(f"sft: dropped {too_long} examples longer than max_len {config.max_len}", file=sys.stderr)

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config.schedule, plan.total_steps, config.lr, config.lr_end)
    state = resume(config.out_dir, model, optimizer, scheduler)
    start = 0
    if state is not None:
        _check_resumable(state.data_position, plan, state.path)
        start = state.step
    with autocast(config, device):
        mask_dtype = compute_dtype(model, device)
    capacity = config.max_tokens_per_row or config.max_len
    rows_per_batch = max(1, config.micro_batch_tokens // capacity)

    def checkpoint(step: int) -> None:
        save(
            config.out_dir,
            model,
            tokenizer,
            optimizer,
            scheduler,
            step,
            plan.position(step),
            config,
            rank=rank,
            keep_last=config.keep_last,
        )

    bar = progress_bar(plan.total_steps, start, rank, "sft" if config.parallel else "sft (sequential)")
    with MetricLogger(config.out_dir, rank, start) as log:
        for step in range(start, plan.total_steps):
            began = time.perf_counter()
            mine = [
                examples[i]
                for ids in micro_batches(plan, config.seed, step, rank, world, config.grad_accum)
                for i in ids
            ]
            lengths = [len(e.prompt_ids) + len(e.response_ids) for e in mine]
            passes = plan_micro_batches(
                lengths,
                packing=config.packing,
                capacity=capacity,
                rows_per_batch=rows_per_batch,
                batch_size=config.batch_size,
            )
            # Token mean over the global batch: each process divides by its share of the global count,
            # and the gradient average over processes restores Σ / total (npr.train.losses).
            tokens = all_reduce_sum(sum(len(e.response_ids) for e in mine))
            seq_tokens = all_reduce_sum(sum(lengths))
            loss_sum = 0.0
            count = equal_micro_batches(len(passes), model)
            for j in range(count):
                with grad_sync(model, enabled=j == count - 1):
                    if j >= len(passes):
                        dummy_backward(model, device)
                        continue
                    flat, rows = local_rows(passes[j])
                    batch = make_batch(
                        [mine[i] for i in flat], tags, tokenizer.pad_token_id, dtype=mask_dtype, rows=rows
                    ).to(device)
                    with autocast(config, device):
                        logits = layout_forward(model, batch, attention)  # [rows, L, V]
                    loss = sft_loss(
                        logits, batch.layout.input_ids, batch.loss_mask, num_tokens=tokens / world
                    )
                    loss.backward()
                    loss_sum += loss.item()
            grad_norm = clip_gradients(model, config.grad_clip)
            lr = float(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            elapsed = time.perf_counter() - began
            if done % config.log_every == 0 or done == plan.total_steps:
                log.log(
                    done,
                    {
                        "train/loss": all_reduce_sum(loss_sum) / world,
                        "train/grad_norm": grad_norm,
                        "train/lr": lr,
                        "train/tokens": tokens,
                        "train/seq_tokens": seq_tokens,
                        "train/step_time": elapsed,
                        "train/tokens_per_s": seq_tokens / elapsed,
                        "train/epoch": done / plan.steps_per_epoch,
                    },
                )
            bar.update(1)
            if config.save_every and done % config.save_every == 0 and done < plan.total_steps:
                checkpoint(done)
        bar.close()
    return finish_run(checkpoint, start, plan.total_steps, config.out_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m npr.train.sft CONFIG` (also what `torchrun … -m npr.train.sft CONFIG` runs)."""
    recipe_main(train, SFTConfig, "npr.train.sft", argv)


if __name__ == "__main__":
    main()
