"""The seed model's corpus: worked sequential solutions plus noisy format attempts, never a clean parallel
trace, so the method stays teacher-free (DESIGN §5). Text only: the caller turns each record into prompt ids.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npr.example import Example


@dataclass(frozen=True)
class SeedRecord:
    """One training text; `parallel` says it answers the format instruction (a noisy attempt)."""

    question: str
    response: str
    parallel: bool


def seed_corpus(
    examples: Sequence[Example],
    solution: Callable[[Example, random.Random | None], str],
    noisy: Callable[[Example, random.Random], str],
    *,
    seed: int,
    noisy_fraction: float,
    shuffled_fraction: float,
) -> list[SeedRecord]:
    """One record per example: a noisy attempt with chance `noisy_fraction`, else a worked solution, in a
    random sub-task order with chance `shuffled_fraction` (a seed that finds a group by its label, not by
    where its line stands, is what parallel branches need).

    The draws are made in a fixed order from one `random.Random(seed)`, so a seed's data is reproducible
    (the committed demo seed was trained on exactly this corpus).
    """
    rng = random.Random(seed)
    records = []
    for ex in examples:
        parallel = rng.random() < noisy_fraction
        if parallel:
            response = noisy(ex, rng)
        else:
            shuffled = shuffled_fraction > 0 and rng.random() < shuffled_fraction  # no draw at 0
            response = solution(ex, rng if shuffled else None)
        records.append(SeedRecord(ex.question, response, parallel))
    return records
