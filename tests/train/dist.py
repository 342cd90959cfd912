"""Helpers for the multi-process tests: a free port and the torchrun environment of one rank."""

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def become_rank(rank: int, world: int, port: int) -> None:
    """Set what torchrun would set for this rank (gloo on loopback), one thread per process."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
