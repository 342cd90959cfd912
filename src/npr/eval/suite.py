"""`evaluate_suite`: run a protocol over several benchmarks and write one result folder per benchmark plus a
suite summary in the paper's table shapes (`npr.eval.tables`).

`load_suite` reads every benchmark first, so bad input (an unknown bench, a missing file, a row without an
answer) is refused before a model is loaded. Each benchmark is then evaluated with its own k and checker by
:func:`npr.eval.evaluate`, on the same engine.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from npr.engine import Engine
from npr.eval.bench import Benchmark, load_bench
from npr.eval.harness import EvalResult, PromptSpec, evaluate
from npr.eval.protocol import Protocol
from npr.eval.tables import SUITE, suite_average, write_suite
from npr.example import Example


@dataclass
class SuiteResult:
    """The per-benchmark results (in benchmark order) and the suite's settings."""

    protocol: Protocol
    runs: dict[str, EvalResult]
    info: dict[str, Any]
    out_dir: Path | None = None

    def summary(self) -> dict[str, Any]:
        """The suite's JSON summary: protocol, info, each benchmark's summary and the averages."""
        summary: dict[str, Any] = {
            "kind": SUITE,
            "protocol": self.protocol.to_dict(),
            "info": self.info,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "benches": {name: run.summary() for name, run in self.runs.items()},
        }
        summary["average"] = suite_average(summary)
        return summary


Suite = Sequence[tuple[Benchmark, list[Example]]]
"""Benchmarks with their loaded problems, in table order."""


def load_suite(
    benches: Sequence[Benchmark], data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[tuple[Benchmark, list[Example]]]:
    """Every benchmark's problems (the first `limit` of each), loaded before anything is decoded."""
    if not benches:
        raise ValueError("a suite needs at least one benchmark")
    return [(b, load_bench(b, data_dir, limit)) for b in benches]


def evaluate_suite(
    engine: Engine,
    suite: Suite,
    protocol: Protocol,
    *,
    baseline: Literal["sequential"] | None = None,
    prompt: PromptSpec | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int | None = 0,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> SuiteResult:
    """Evaluate `engine` on each benchmark of `suite` (see `load_suite`) under `protocol`.

    With `out_dir`, each benchmark's result folder is `out_dir/<bench>/` and the suite's summary files go to
    `out_dir`. `baseline="sequential"` also decodes every benchmark sequentially, for the speedups.
    """
    if not suite:
        raise ValueError("evaluate_suite needs at least one benchmark")
    result = SuiteResult(protocol, {}, dict(info or {}), Path(out_dir) if out_dir is not None else None)
    for i, (bench, examples) in enumerate(suite):
        params = protocol.params(bench, seed=seed)
        result.runs[bench.name] = evaluate(
            engine,
            examples,
            k=params.n,
            params=params,
            mode=protocol.mode,
            baseline=baseline,
            progress=progress,
            out_dir=result.out_dir / bench.name if result.out_dir else None,
            verifier=bench.check,
            warmup=i == 0,  # one warm-up per engine is enough
            info={**result.info, "bench": bench.name, "title": bench.title, "source": bench.source},
            prompt=prompt,
        )
    if result.out_dir is not None:
        write_suite(result.summary(), result.out_dir)
    return result
