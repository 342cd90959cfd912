"""Checkpoints that a killed run resumes from, reaching the same result as an unbroken run (DESIGN §5).

A run directory holds checkpoint folders `step-000123/`, each with
- the model (and tokenizer) as `save_pretrained` writes them, so a checkpoint loads with `from_pretrained`;
- `trainer_state.pt`: step, data position, optimizer, scheduler, RNG states (python, numpy, torch, CUDA)
  and the trainer's `extra`; plain tensors and containers, so it loads with `weights_only=True`;
- `train_config.json`: the resolved training config, library versions and seed, for people and tools
  (`config.json` is the model's own, written by `save_pretrained`).

A folder appears whole or not at all: it is written under a hidden `.tmp-*` name and renamed into place
when complete. The `latest` file then names it, replaced atomically too; only the newest `keep_last`
folders are kept. This survives the process being killed at any point (not a power cut: nothing is
fsync'd). Under DDP or FSDP only rank 0 writes; the RNG states saved are rank 0's.

Weights and optimizer state are stored **full** (unsharded), the optimizer's keyed by parameter name
(`torch.distributed.checkpoint.state_dict`'s full form): one format for one process, DDP and FSDP, so a
run resumes under any of them, and a checkpoint is an ordinary `save_pretrained` folder. The price at
scale is that rank 0 gathers everything (CPU offloaded) once per save; sharded (DCP) checkpoints would
avoid it and are not implemented.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from pydantic import BaseModel
from safetensors.torch import load_file

import npr
from npr.files import atomic_write
from npr.train.distributed import full_model_state, full_optimizer_state, load_full_state, unwrap

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
LATEST_FILE = "latest"
_TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class TrainerState:
    """What `load_checkpoint` hands back to the trainer besides the restored objects."""

    path: Path
    step: int
    data_position: Any
    config: dict[str, Any]
    extra: dict[str, Any]


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step`, e.g. `step-000123`."""
    return f"step-{step:06d}"


def _rng_state() -> dict[str, Any]:
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, cached = legacy  # MT19937 keys [624] and the Gaussian cache
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy arrays do not load under weights_only: keep the MT19937 keys as a tensor.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _versions() -> dict[str, str]:
    import transformers  # only here: importing it costs seconds

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "npr": npr.__version__,
    }


def _step_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders in `run_dir`, oldest step first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in run_dir.iterdir()
        if (match := _STEP_DIR.fullmatch(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing `target` (a step saved again after a resume) is replaced."""
    if target.exists():
        old = target.with_name(f"{_TMP_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def save_checkpoint(
    run_dir: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    scheduler: LRScheduler | None,
    step: int,
    data_position: Any,
    config: BaseModel | Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    keep_last: int = 2,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step-NNNNNN/` into `run_dir` atomically, point `latest` at it, prune old ones.

    `optimizer` and `weights` may be given as full state dicts already gathered (`npr.train.distributed`:
    how a sharded model is saved); by default they are read off the (unsharded) model and optimizer.
    `data_position` (plain ints/strings/lists/dicts, e.g. `{"epoch": 0, "index": 96}`) and `extra` must
    load under `torch.load(weights_only=True)`. Returns the checkpoint folder.
    """
    if step < 0 or keep_last < 1:
        raise ValueError(f"need step >= 0 and keep_last >= 1, got step={step}, keep_last={keep_last}")
    rng = _rng_state()  # first, so that nothing below shifts what the resumed run draws
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f"{_TMP_PREFIX}*"):  # left by a run killed while saving
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    config_dict = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    target = run_dir / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=run_dir))
    try:
        model.save_pretrained(tmp, state_dict=dict(weights or full_model_state(model)))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = full_optimizer_state(model, optimizer)
        state = {
            "step": step,
            "data_position": data_position,
            "optimizer": dict(optimizer),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": rng,
            "extra": dict(extra or {}),
        }
        torch.save(state, tmp / STATE_FILE)
        summary = {
            "step": step,
            "seed": config_dict.get("seed"),
            "versions": _versions(),
            "config": config_dict,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(run_dir / LATEST_FILE, target.name + "\n")
    for old in _step_dirs(run_dir)[:-keep_last]:
        if old != target:
            shutil.rmtree(old)
    return target


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else the highest complete `step-*` folder, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        named = run_dir / pointer.read_text(encoding="utf-8").strip()
        if (named / STATE_FILE).is_file():
            return named
    steps = _step_dirs(run_dir)  # `latest` is missing if the run was killed between rename and pointer
    return steps[-1] if steps else None


def resolve_model_dir(path: str | Path) -> Path:
    """A config's `model_path`: a run directory means its latest checkpoint, anything else itself."""
    return latest_checkpoint(path) or Path(path)


def _read_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The safetensors weights in `path` (one file or an index of shards), checked against `model`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(path / name))
    # save_pretrained leaves out tied weights (lm_head = embeddings): missing but loaded through the tie.
    own = set(model.state_dict())
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[key]) for key in weights if key in params}
    untied = [key for key in sorted(own - weights.keys()) if id(params.get(key)) not in loaded]
    unexpected = [key for key in weights if key not in own]
    if untied or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {untied}, unexpected {unexpected}")
    return weights


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states from checkpoint folder `path` in place.

    `model` may be plain, DDP-wrapped or FSDP-sharded (the full state is cut to each process's shard).
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {STATE_FILE} is missing")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    load_full_state(model, _read_weights(path, unwrap(model)), optimizer, state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"{path}: checkpoint was saved without a scheduler, but one was given")
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    summary = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    return TrainerState(
        path=path,
        step=state["step"],
        data_position=state["data_position"],
        config=summary["config"],
        extra=state["extra"],
    )
