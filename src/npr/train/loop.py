"""Plumbing every training recipe shares: processes, optimizer, schedule, logging, checkpoints (DESIGN §5).

The recipes (`npr.train.sft`, `npr.train.rl`) stay readable top to bottom by calling these small pieces;
nothing here owns the loop. One process or many under `torchrun` (DDP or FSDP2, `npr.train.distributed`):

    rank, world = init_distributed()
    device = device_for(rank)
    model, tokenizer, attention = prepare_model(config, device)      # attention kernel, wrapping
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, "cosine", total_steps, config.lr, config.lr_end)
    state = resume(config.out_dir, model, optimizer, scheduler)      # None on a fresh run
    with MetricLogger(config.out_dir, rank, start_step) as log:
        for step in ...:                                              # per micro-batch j of the step:
            with grad_sync(model, enabled=last_micro_batch), autocast(config, device):
                loss = sft_loss(layout_forward(model, batch, attention), ...)
            loss.backward()
            grad_norm = clip_gradients(model, config.grad_clip); optimizer.step(); scheduler.step()
            log.log(step + 1, {"train/loss": ...})
    save(config.out_dir, model, tokenizer, optimizer, scheduler, step, position, config, rank=rank)
    close_distributed()

Logging: rank 0 appends one JSON object per logged step to `out_dir/metrics.jsonl`, and writes TensorBoard
events to `out_dir/tb/` when the `tensorboard` package is importable (it is not a dependency).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from npr.attention import Kernel, resolve_attention, use_attention
from npr.files import atomic_write
from npr.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from npr.train.config import ConfigError
from npr.train.distributed import (
    barrier,
    close_distributed,
    full_model_state,
    full_optimizer_state,
    gradient_norm,
    unwrap,
    wrap_model,
)

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
Schedule = Literal["cosine", "constant"]

# ------------------------------------------------------------------------------------------------ setup


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) the same on every process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ model


def load_train_model(
    model_path: str, dtype: str, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A config's `model_path` (folder, run directory → its latest checkpoint, or `tiny`) in train mode."""
    from npr.model import TINY, load_any
    from npr.train.checkpoint import resolve_model_dir

    model, tokenizer = load_any(model_path if model_path == TINY else str(resolve_model_dir(model_path)))
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return model.train(), tokenizer


def prepare_model(
    config: Any, device: torch.device, *, ddp: bool = True
) -> tuple[torch.nn.Module, Any, Kernel]:
    """Load the config's model for training and wrap it for the processes; returns `(model, tokenizer,
    attention)` where `attention` is the kernel the forwards use (`dense` or `flex`).

    The config's `attention`, `activation_checkpointing`, `distributed` and `precision` apply here.
    `ddp=False`: a recipe whose processes run different numbers of backward passes (RL) keeps DDP off and
    averages gradients itself (`distributed.average_gradients`); FSDP always wraps.
    """
    model, tokenizer = load_train_model(config.model_path, config.dtype, device)
    try:
        attention = resolve_attention(config.attention, device, backward=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    use_attention(model, attention)
    if config.activation_checkpointing:  # recompute each layer's activations in backward
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    wrap = config.distributed == "fsdp" or ddp
    wrapped = (
        wrap_model(model, device, config.distributed, bf16=config.precision == "bf16") if wrap else model
    )
    return wrapped, tokenizer, attention


def autocast(config: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast around forwards when `precision: bf16` (log-probs and losses stay float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


# ------------------------------------------------------------------------------------------------ optimizer


def build_optimizer(model: torch.nn.Module, config: Any) -> torch.optim.AdamW:
    """AdamW with the config's `lr`, `betas` and `weight_decay`.

    Decay applies to matrices only: norm gains and biases (1-D) are not pulled towards zero, as is usual
    for transformers (GPT-2, Llama recipes).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def lr_factor(step: int, total_steps: int, schedule: Schedule, lr: float, lr_end: float) -> float:
    """Multiplier of the peak `lr` after `step` optimizer steps.

    cosine: from 1 at step 0 to `lr_end / lr` at `total_steps` (and after), half a cosine period.

    >>> lr_factor(0, 10, "cosine", 1e-6, 5e-7), lr_factor(5, 10, "cosine", 1e-6, 5e-7)
    (1.0, 0.75)
    >>> lr_factor(10, 10, "cosine", 1e-6, 5e-7), lr_factor(3, 10, "constant", 1e-6, 5e-7)
    (0.5, 1.0)
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    progress = min(step, total_steps) / max(total_steps, 1)
    floor = lr_end / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int, lr: float, lr_end: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimizer step; see `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, schedule, lr, lr_end)
    )


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to `max_norm` (None: no clipping); returns the norm before clipping.

    Call after the backward passes: under DDP the gradients are already averaged, so every process
    computes the same norm and clips alike; under FSDP the norm is reduced over the shards.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = math.inf if max_norm is None else max_norm
    return gradient_norm(torch.nn.utils.clip_grad_norm_(params, limit))


# ------------------------------------------------------------------------------------------------ checkpoints


def resume(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
) -> TrainerState | None:
    """Restore the latest checkpoint of `run_dir` in place (every process reads it); None if there is none.

    Call after `prepare_model` and `build_optimizer` (a sharded model takes its shard of the full state).
    Every process restores rank 0's RNG states, so draws stay in step.
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    return load_checkpoint(path, model, optimizer, scheduler)


def save(
    run_dir: str | Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    step: int,
    data_position: Any,
    config: BaseModel | Mapping[str, Any],
    *,
    rank: int,
    keep_last: int = 2,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Rank 0 writes checkpoint `step` (see `npr.train.checkpoint`); the others wait until it is complete.

    Every process takes part in gathering the full weights and optimizer state (collectives under FSDP).
    """
    weights, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)
    if rank == 0:
        save_checkpoint(
            run_dir,
            unwrap(model),
            tokenizer,
            optimizer_state,
            scheduler,
            step,
            data_position,
            config,
            extra=extra,
            keep_last=keep_last,
            weights=weights,
        )
    barrier()


# ------------------------------------------------------------------------------------------------ logging


def _tensorboard_writer(log_dir: Path) -> Any:
    """A SummaryWriter when `tensorboard` is installed, else None (metrics still go to JSONL)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the optional `tensorboard` package
        return None
    return SummaryWriter(str(log_dir))


class MetricLogger:
    """Rank 0's metrics: one JSON line per `log` call in `out_dir/metrics.jsonl`, plus TensorBoard.

    Resuming at `start_step` drops the lines a killed run wrote after its last checkpoint, so the file
    has each step once. On other ranks every method does nothing.
    """

    def __init__(self, out_dir: str | Path, rank: int = 0, start_step: int = 0) -> None:
        self.enabled = rank == 0
        self.path = Path(out_dir) / METRICS_FILE
        self.writer: Any = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.writer = _tensorboard_writer(self.path.parent / TENSORBOARD_DIR)

    @property
    def tensorboard(self) -> bool:
        return self.writer is not None

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record `metrics` (names like `train/loss`) at optimizer step `step`."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `out_dir/metrics.jsonl`, in order."""
    text = (Path(out_dir) / METRICS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def progress_bar(total: int, initial: int, rank: int, desc: str) -> tqdm:
    """A tqdm bar over optimizer steps, shown on rank 0 only."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=rank != 0, dynamic_ncols=True)


def recipe_main(train: Callable[[Any], Path], config_cls: type, module: str, argv: list[str] | None) -> None:
    """`python -m MODULE CONFIG` (also what `torchrun … -m MODULE CONFIG` runs): train, print the result."""
    from npr.train.config import load_config

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {module} CONFIG.yaml")
    final = train(load_config(args[0], config_cls))
    if int(os.environ.get("RANK", "0")) == 0:
        print(final)


def finish_run(checkpoint: Callable[[int], None], start: int, total: int, out_dir: str | Path) -> Path:
    """Save the final checkpoint (unless the run resumed from it), leave the process group, return its path."""
    from npr.train.checkpoint import checkpoint_name

    if start < total:  # else the run was complete and resumed from its final checkpoint
        checkpoint(total)
    close_distributed()
    return Path(out_dir) / checkpoint_name(total)
