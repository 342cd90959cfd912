"""FSDP2 on two CPU processes (gloo) makes the updates of one process, and a resumed FSDP run those of an unbroken one.

Each test forks two workers once and runs several trainings in them (each on its own port), so the cost of
starting processes and importing is paid once. Packing is on (the default), so the processes run
different numbers of packed forward passes: the shorter one pads with zero-gradient passes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from npr.train import rl, sft
from tests.train.dist import become_rank, free_port
from tests.train.test_ddp_rl import PAPO
from tests.train.test_rl import initial_weights, rl_config, scripted, varied_check
from tests.train.test_sft import SUMS, sft_config, weights

TRAIN: dict[str, Callable[..., Path]] = {
    "sft": sft.train,
    "rl": lambda config: rl.train(config, check=varied_check, logits_processors=[scripted(PAPO)]),
}


def _worker(rank: int, world: int, kind: str, runs: list[tuple[int, Any]]) -> None:
    for port, config in runs:
        become_rank(rank, world, port)
        os.environ["MASTER_PORT"] = str(port)
        TRAIN[kind](config)  # leaves the process group at its end


def _run_two(kind: str, configs: list[Any]) -> None:
    runs = [(free_port(), config) for config in configs]
    workers = mp.start_processes(_worker, args=(2, kind, runs), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not workers.join(timeout=0.5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the two {kind} workers did not finish within 120 s")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _single(train: Callable[[Any], Path], config: Any) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config)
    finally:
        torch.set_num_threads(threads)


def test_fsdp_sft_equals_one_process_and_resumes_exactly(tmp_path):
    common = {"lr": 1e-3, "schedule": "constant", "grad_clip": 1.0, "max_steps": 3, "epochs": 2}
    sums = SUMS[:6]
    for name in ("one", "fsdp", "resumed"):
        (tmp_path / name).mkdir()
    one = sft_config(tmp_path / "one", sums, batch_size=4, **common)
    fsdp = sft_config(tmp_path / "fsdp", sums, batch_size=2, distributed="fsdp", **common)
    first_two = sft_config(
        tmp_path / "resumed", sums, batch_size=2, distributed="fsdp", **common | {"max_steps": 2}
    )
    resumed = first_two.model_copy(update={"max_steps": 3})  # same out_dir: resumes at step 2
    single = _single(TRAIN["sft"], one)
    _run_two("sft", [fsdp, first_two, resumed])

    w1, w2, w3 = (weights(Path(c.out_dir) / single.name) for c in (one, fsdp, resumed))
    assert _max_diff(w1, {k: v for k, v in initial_weights().items() if k in w1}) > 1e-4  # it trained
    assert _max_diff(w1, w2) < 1e-5
    assert _max_diff(w2, w3) < 1e-6


def test_fsdp_rl_equals_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "fsdp").mkdir()
    one = rl_config(tmp_path / "one", list(PAPO), max_steps=2)
    fsdp = rl_config(tmp_path / "fsdp", list(PAPO), max_steps=2, distributed="fsdp")
    single = _single(TRAIN["rl"], one)
    _run_two("rl", [fsdp])
    w1, w2 = weights(single), weights(Path(fsdp.out_dir) / single.name)
    assert _max_diff(w1, {k: v for k, v in initial_weights().items() if k in w1}) > 1e-4
    assert _max_diff(w1, w2) < 1e-5
