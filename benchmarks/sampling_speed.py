"""Batched sampling vs one row at a time: the per-step sampling cost of an engine step with P rows.

    python benchmarks/sampling_speed.py [--vocab 1011] [--repeats 200]

Each engine step samples one token per live row (a trunk or a branch). The engine samples all rows in one
call of `sample_tokens`; the alternative is a call per row. Both run on the same logits, interleaved, with
the demo's settings (T 1, top-p 0.7, branch penalty on); the medians and their ratio are printed. Not part
of the tests.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch

from npr.engine.params import SamplingParams
from npr.engine.sampling import sample_tokens


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1011, help="1011: the demo model's vocabulary")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| rows | one call (ms) | a call per row (ms) | ratio |")
    print("|---|---|---|---|")
    params = SamplingParams(temperature=1.0, top_p=0.7)
    for rows in (1, 4, 16, 64):
        logits = torch.randn(rows, args.vocab)
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        seen = [list(range(i, i + 30)) for i in range(rows)]
        batched = partial(sample_tokens, logits, [params] * rows, gens, seen)
        per_row = [
            partial(sample_tokens, logits[i : i + 1], [params], [gens[i]], [seen[i]]) for i in range(rows)
        ]
        b = _time(batched, args.repeats)
        p = _time(lambda calls=per_row: [call() for call in calls], args.repeats)
        print(f"| {rows} | {b * 1e3:.3f} | {p * 1e3:.3f} | {p / b:.2f}× |")


if __name__ == "__main__":
    main()
