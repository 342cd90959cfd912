"""Single-request latency of every model, robust to a shared machine's load.

Each problem is timed `latency_repeats` times per model; the models take turns within each repeat, so a
burst of load lands on all of them alike, and the median of a problem's tries is kept. The spread of the
tries and the machine's load average during the timing go into the report, with a warning when either says
the numbers are unreliable.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npr.example import Example
from npr.pipeline.cache import content_hash, read_cached, write_cached

if TYPE_CHECKING:
    from npr.pipeline.stages import Pipeline

HIGH_LOAD_PER_CORE = 1.0
"""A 1-minute load average above this many runnable tasks per core means other work shared the CPU."""
HIGH_SPREAD = 0.25
"""A median (max − min) / median of a problem's tries above this means the timings are noisy."""


@dataclass(frozen=True)
class Latency:
    """Per split, model and problem: the seconds of each try; and the load averages seen while timing."""

    tries: dict[str, dict[str, list[list[float]]]]
    load: list[float]

    def median(self, split: str, model: str) -> list[float]:
        """Per problem: the median of its tries."""
        return [statistics.median(t) for t in self.tries[split][model]]

    def spread(self, split: str, model: str) -> float:
        """Median over problems of (max − min) / median of the tries: how much a repeat moves."""
        rows = self.tries[split][model]
        return statistics.median((max(t) - min(t)) / statistics.median(t) for t in rows)

    def warning(self) -> str | None:
        """Why these timings may be unreliable (high load or a wide spread), or None."""
        cores = os.cpu_count() or 1
        peak = max(self.load, default=0.0)
        spread = max((self.spread(s, m) for s, models in self.tries.items() for m in models), default=0.0)
        reasons = []
        if peak / cores > HIGH_LOAD_PER_CORE:
            reasons.append(f"the load average reached {peak:.1f} on {cores} cores")
        if spread > HIGH_SPREAD:
            reasons.append(f"repeats of one problem differed by up to {spread:.0%} of their median")
        if not reasons:
            return None
        return "latency measured on a busy machine (" + "; ".join(reasons) + "): speedups may be off"

    def to_dict(self) -> dict[str, Any]:
        return {"tries": self.tries, "load": self.load}


def measure_latency(pipeline: Pipeline, models: dict[str, str], splits: dict[str, list[Example]]) -> Latency:
    """Time every model on the first `latency_problems` of each split (cached in OUT_DIR/latency.json)."""
    from npr.eval.harness import LatencyRun, solo_latencies
    from npr.pipeline.evaluation import decoding, eval_params, make_engine

    spec = pipeline.config.eval
    cached = pipeline.out_dir / "latency.json"
    settings = {
        **pipeline.data_settings(),
        "eval": spec.model_dump(),
        "models": {name: content_hash(path) for name, path in models.items()},
    }
    if (done := read_cached(cached, settings)) is not None:
        pipeline.log("[latency] cached")
        return Latency(done["tries"], done["load"])
    pipeline.log(
        f"[latency] {len(models)} models take turns on {spec.latency_problems} problems per split, "
        f"{spec.latency_repeats} times each"
    )
    runs = {
        name: LatencyRun(make_engine(path, spec.backend), *decoding(name, pipeline.config.prompt_style))
        for name, path in models.items()
    }
    params = eval_params(pipeline)
    tries: dict[str, dict[str, list[list[float]]]] = {}
    load: list[float] = []
    for split, examples in splits.items():
        tries[split] = {name: [] for name in runs}
        for ex in examples[: spec.latency_problems]:
            for name in runs:
                tries[split][name].append([])
            for _ in range(spec.latency_repeats):
                load.append(os.getloadavg()[0])
                for name, seconds in solo_latencies(runs, [ex], params).items():
                    tries[split][name][-1].append(seconds[0])
    latency = Latency(tries, load)
    write_cached(cached, latency.to_dict(), settings)
    return latency
