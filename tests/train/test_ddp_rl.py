"""Two CPU processes (gloo) with a global batch of B prompts make the same RL update as one process with B.

The workers join the process group the way `torchrun` describes it (RANK, WORLD_SIZE, MASTER_* in the
environment), so the recipe runs its real multi-process path: each decodes its share of the prompts, scores
are all-gathered, advantages use the global batch's std, gradients are averaged explicitly. The batches mix
prompts that are kept with prompts that are filtered, so the processes keep different numbers of rollouts:
in the DAPO case each process has one prompt, and one of them keeps nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from npr.train.config import RLConfig
from npr.train.loop import read_metrics
from npr.train.rl import train
from tests.train.dist import become_rank, free_port
from tests.train.test_rl import (
    FORKS,
    FORKS_TOO,
    PERFECT,
    initial_weights,
    rl_config,
    scripted,
    varied_check,
    weights,
)

PAPO = {FORKS: "forks", FORKS_TOO: "forks", "What is 6 * 7?": "malformed", "What is 9 - 1?": "rambling"}
DAPO = {FORKS: "forks", FORKS_TOO: PERFECT}  # the PERFECT group is dropped by dynamic sampling
CASES = {
    "papo": (PAPO, {}),
    "dapo-two-updates": (DAPO, {"algorithm": "dapo", "updates_per_batch": 2}),
}


def _worker(rank: int, world: int, port: int, config: RLConfig, shapes: dict[str, str]) -> None:
    become_rank(rank, world, port)
    train(config, check=varied_check, logits_processors=[scripted(shapes)])


def _delta(checkpoint: Path, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v - before[k] for k, v in weights(checkpoint).items()}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_make_the_update_of_one_with_the_same_global_batch(tmp_path, case):
    shapes, overrides = CASES[case]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = rl_config(tmp_path / "one", list(shapes), **overrides)
    two = rl_config(tmp_path / "two", list(shapes), **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(one, check=varied_check, logits_processors=[scripted(shapes)])
    finally:
        torch.set_num_threads(threads)
    # fork, not spawn: the workers inherit the imported modules (a spawned worker re-imports torch and
    # transformers, many seconds on a busy machine); each uses one thread, as DataLoader workers do.
    workers = mp.start_processes(
        _worker, args=(2, free_port(), two, shapes), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300
    while not workers.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two RL workers did not finish within 300 s")

    # The same rollouts were sampled: seeds follow the prompt's position in the global batch.
    [m1], [m2] = read_metrics(one.out_dir), read_metrics(two.out_dir)
    for key in ("reward/mean", "rollout/kept", "filtered/malformed", "filtered/length", "tokens/total"):
        assert m1[key] == m2[key], key
    assert abs(m1["train/clip_fraction"] - m2["train/clip_fraction"]) < 1e-6
    assert m1["tokens/trained"] == m2["tokens/trained"] > 0

    before = initial_weights()
    d1, d2 = _delta(single, before), _delta(Path(two.out_dir) / single.name, before)
    assert max(v.abs().max().item() for v in d1.values()) > 1e-4  # a real update, not two zeros
    assert max((d1[k] - d2[k]).abs().max().item() for k in d1) < 1e-5
    assert abs(m1["train/grad_norm"] - m2["train/grad_norm"]) < 1e-5
