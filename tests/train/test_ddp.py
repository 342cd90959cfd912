"""Two CPU processes (DDP, gloo) with a global batch of B sequences make the SFT update of one process with B.

The workers join the process group as `torchrun` describes it (RANK, WORLD_SIZE, MASTER_* in the
environment), so the recipe runs its real DDP path. The examples differ in length, so the two processes
hold different token counts: only a token mean over the global batch makes the updates agree.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from npr.train.config import SFTConfig
from npr.train.loop import read_metrics
from npr.train.sft import train
from tests.train.dist import become_rank, free_port
from tests.train.test_sft import SUMS, sft_config, weights, weights_of_seed

# Global batch 4 per step, 2 steps: one process × 4 sequences, or 2 processes × 2 micro-batches of 1.
ONE = {"batch_size": 4, "grad_accum": 1}
TWO = {"batch_size": 1, "grad_accum": 2}
LONGER = [(12, 345), (6789, 1), (2, 3), (40, 50), (123, 4), (5, 5), (99, 1), (7, 777)]


def _worker(rank: int, world: int, port: int, config: SFTConfig) -> None:
    become_rank(rank, world, port)
    train(config)


def test_two_processes_make_the_update_of_one_with_the_same_global_batch(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    sums = SUMS[:4] + LONGER[:4]  # short and long sequences: the processes hold different token counts
    common = {"epochs": 1, "lr": 1e-3, "schedule": "constant", "grad_clip": 1.0}
    one = sft_config(tmp_path / "one", sums, **common, **ONE)
    two = sft_config(tmp_path / "two", sums, **common, **TWO)
    single = train(one)
    # fork, not spawn: the workers inherit the imported modules instead of re-importing torch and transformers.
    workers = mp.start_processes(
        _worker, args=(2, free_port(), two), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300
    while not workers.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two SFT workers did not finish within 300 s")

    m1, m2 = read_metrics(one.out_dir), read_metrics(two.out_dir)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["train/tokens"] == b["train/tokens"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-5)
    seed = weights_of_seed()
    w1, w2 = weights(single), weights(Path(two.out_dir) / single.name)
    assert max((w1[k] - seed[k]).abs().max().item() for k in w1) > 1e-4  # a real update
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
