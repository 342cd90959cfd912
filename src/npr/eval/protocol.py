"""Evaluation protocols: named presets of sampling settings, samples per problem and decoding mode.

`paper` is the paper's protocol: temperature 1.0, top-p 0.7 (DESIGN §7), avg@8 on AIME24/AIME25/HMMT25/AMC23
and avg@1 on the other benchmarks (each benchmark's own k, `npr.eval.bench`), NPR models decoded in parallel,
and a budget of 40,000 new tokens. The budget is the one the official release's README passes to its
evaluation (`evals/scripts/eval.sh … --max_new_tokens 40000`, github.com/bigai-nlco/Native-Parallel-Reasoner);
that script's own default is 30,000, so the paper's numbers sit in a 30k–40k budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from npr.engine import Mode, SamplingParams
from npr.eval.bench import Benchmark

PAPER_MAX_NEW_TOKENS = 40_000
"""Budget over all branches of one answer in the paper's protocol (see the module docstring)."""


@dataclass(frozen=True)
class Protocol:
    """Sampling settings, samples per problem (None: each benchmark's own k) and the decoding mode."""

    name: str
    temperature: float
    top_p: float
    max_new_tokens: int
    mode: Mode = "parallel"
    k: int | None = None

    def k_for(self, bench: Benchmark) -> int:
        return self.k if self.k is not None else bench.k

    def params(self, bench: Benchmark, **overrides: Any) -> SamplingParams:
        """The sampling parameters for one benchmark; keyword arguments override (e.g. `seed`)."""
        settings: dict[str, Any] = {
            "n": self.k_for(bench),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }
        return SamplingParams(**{**settings, **overrides})

    def with_overrides(self, **changes: Any) -> Protocol:
        """A copy with the given fields replaced; None values keep the preset's field."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol("paper", temperature=1.0, top_p=0.7, max_new_tokens=PAPER_MAX_NEW_TOKENS),
}
"""Named protocols for `npr eval --protocol`."""


def get_protocol(name: str) -> Protocol:
    """The protocol called `name`; the error lists the known names."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r} (known: {sorted(PROTOCOLS)})")
    return PROTOCOLS[name]
