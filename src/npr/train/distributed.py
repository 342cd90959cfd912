"""Processes for every training recipe: the process group, DDP or FSDP2, collectives, phase timers (DESIGN §5).

One process, or several under `torchrun` (`gloo` on CPU, `nccl` on GPUs), with `distributed: ddp | fsdp`:
- `ddp`: every process holds the whole model; gradients are averaged during the last backward of a step.
- `fsdp`: FSDP2 (`fully_shard`) on each decoder layer, then on the root: parameters, gradients and
  optimizer state are sharded over processes and gathered layer by layer in forward and backward. Every
  process must then run the same number of forward/backward passes (the gathers are collectives):
  `equal_micro_batches` tells a recipe how many to run, padding with `dummy_backward`.

Checkpoints hold full (unsharded) state dicts in either mode (`full_model_state`, `full_optimizer_state`,
`load_full_state`), so a run saved under one mode resumes under the other or on one process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

Distributed = Literal["ddp", "fsdp"]
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

# ------------------------------------------------------------------------------------------------ group


def init_distributed() -> tuple[int, int]:
    """Join the process group `torchrun` describes (env `WORLD_SIZE` > 1); returns `(rank, world)`.

    A plain single process gets `(0, 1)` and no process group. A group that is already initialised (a
    test that spawned its own workers) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    global _OWN_GROUP
    _OWN_GROUP = True
    return dist.get_rank(), dist.get_world_size()


_OWN_GROUP = False
"""Whether `init_distributed` made the default group: only that one is ours to destroy (an in-process vLLM
engine makes its own, and a test that spawned workers owns theirs)."""


def close_distributed() -> None:
    """Leave the process group `init_distributed` joined, if any (call once at the end of a recipe)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def device_for(rank: int) -> torch.device:
    """`cuda:LOCAL_RANK` when GPUs are present (one per process), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def _all_reduce(value: float, op: dist.ReduceOp.RedOpType) -> float:
    if not is_distributed():
        return float(value)
    # float64: gloo reduces CPU tensors, and token counts stay exact.
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def all_reduce_sum(value: float) -> float:
    """Σ of a number over all processes (itself on one): e.g. the global batch's token count."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_reduce_max(value: float) -> float:
    return _all_reduce(value, dist.ReduceOp.MAX)


def all_gather_rows(table: Tensor) -> Tensor:
    """Every process's `[n, K]` rows (same n on each), concatenated in rank order: `[world · n, K]`."""
    if not is_distributed():
        return table
    device = _collective_device()
    local = table.to(device) if device is not None else table
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(table.device)


def average_gradients(model: torch.nn.Module) -> None:
    """Average the accumulated gradients of an unwrapped model over processes (one all-reduce per
    parameter, overlapped); for recipes whose processes run different numbers of backward passes."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a process that had nothing to train still takes part
                p.grad = torch.zeros_like(p)
            handles.append((p.grad, dist.all_reduce(p.grad, async_op=True)))
    for grad, handle in handles:
        handle.wait()
        grad.div_(world)


# ------------------------------------------------------------------------------------------------ wrapping


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes, e.g. Qwen3DecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found to shard (_no_split_modules {names})"
        )
    return layers


def wrap_model(
    model: torch.nn.Module, device: torch.device, mode: Distributed = "ddp", *, bf16: bool = False
) -> torch.nn.Module:
    """DDP or FSDP2 around `model` when several processes run, else `model` itself.

    FSDP2 shards each decoder layer and then the root (the embeddings, the final norm and the LM head,
    tied or not); `bf16` gathers parameters in bfloat16 and reduces gradients in float32 (mixed precision
    with float32 master weights). Both average gradients over processes; the losses divide by the global
    token count over the world size (`npr.train.losses`), so the average is the global token mean.
    """
    if not is_distributed():
        return model
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mp_policy": policy} if policy else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: torch.nn.Module) -> Any:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's backward: reduce gradients over processes only when `enabled` (the last).

    Skipping the reduction on the other micro-batches of a step saves traffic; the result is the same,
    since the final reduction averages the accumulated sums.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
        return
    if enabled or not isinstance(model, DistributedDataParallel):
        yield
        return
    with model.no_sync():
        yield


def equal_micro_batches(count: int, model: torch.nn.Module) -> int:
    """How many micro-batches this process runs: its own `count`, or under FSDP the most of any process
    (its gathers are collectives; the missing ones are `dummy_backward` passes)."""
    return int(all_reduce_max(count)) if is_sharded(model) else count


def dummy_backward(model: torch.nn.Module, device: torch.device) -> None:
    """A forward/backward of one token that adds zero to every gradient: an FSDP process's turn in a
    collective it has no data for."""
    logits = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device)).logits
    (logits.float().sum() * 0.0).backward()


def gradient_norm(norm: Tensor) -> float:
    """A norm from `clip_grad_norm_` as a number (under FSDP it is a DTensor)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# ------------------------------------------------------------------------------------------------ state


def full_model_state(model: torch.nn.Module, *, everywhere: bool = False) -> dict[str, Tensor]:
    """The unsharded weights (a collective under FSDP: every process calls it). Rank 0 gets them on the
    CPU; with `everywhere`, every process gets them on the model's device (to sync an inference copy)."""
    options = StateDictOptions(full_state_dict=True) if everywhere else _FULL
    base = unwrap(model)
    state = get_model_state_dict(base, options=options)
    # One entry per tied parameter (lm_head = embeddings), as save_pretrained expects: gathered copies of
    # a shared parameter are no longer recognisably the same tensor.
    own = {name for name, _ in base.named_parameters()} | {name for name, _ in base.named_buffers()}
    return {name: value for name, value in state.items() if name in own and isinstance(value, Tensor)}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, unsharded (collective under FSDP, like the weights)."""
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_state(
    model: torch.nn.Module,
    weights: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
) -> None:
    """Load full (unsharded) weights, and optimizer state by name, into a plain, DDP or FSDP model."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(unwrap(model), dict(weights), options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, dict(optimizer_state), options=options)


# ------------------------------------------------------------------------------------------------ timing


class Timer:
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
