"""Procedural tasks of our own: a generator, the solutions a seed model learns from, and a verifier that checks
every intermediate result (`group_max`, the demo's task). `npr.data.load_task` finds them here by name.

This package builds on `npr.example` and `npr.format` only; `npr.data` imports it, never the other way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from npr.example import Example
from npr.tasks.group_max import (
    LABELS,
    NOISE,
    SMALL_FLAWS,
    check_group_max,
    make_group_max,
    noisy_attempt,
    parallel_solution,
    sequential_solution,
)
from npr.tasks.seed_data import SeedRecord, seed_corpus

__all__ = [
    "LABELS",
    "NOISE",
    "SMALL_FLAWS",
    "TASKS",
    "SeedRecord",
    "Task",
    "check_group_max",
    "make_group_max",
    "noisy_attempt",
    "parallel_solution",
    "seed_corpus",
    "sequential_solution",
    "task_check",
]


@dataclass(frozen=True)
class Task:
    """A procedural task: its generator, its verifier, and the two kinds of text a seed model learns from.

    `solution(example, rng)` is a worked sequential solution (with an rng: the sub-tasks in a random order);
    `noisy(example, rng)` a format attempt with the right content and at least one flaw.
    """

    make: Callable[..., list[Example]]
    check: Callable[[str, Example], bool]
    solution: Callable[[Example, random.Random | None], str]
    noisy: Callable[[Example, random.Random], str]


TASKS: dict[str, Task] = {
    "group_max": Task(make_group_max, check_group_max, sequential_solution, noisy_attempt),
}


def task_check(examples: list[Example]) -> Callable[[str, Example], bool] | None:
    """The intermediate-checking verifier of our own task, if every example comes from one; else None."""
    names = {ex.meta.get("task") for ex in examples}
    if len(names) == 1 and (name := names.pop()) in TASKS:
        return TASKS[name].check
    return None
