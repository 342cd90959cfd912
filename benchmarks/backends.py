"""llama.cpp vs our HF engine, side by side in one run (nothing to download: SmolLM2 ships in a package).

    python benchmarks/backends.py            # SmolLM2-135M and the demo seed (minutes on 2 CPU cores)
    python benchmarks/backends.py --quick    # the tiny test model only

For each model and case it prints tokens/s on both backends and their ratio (llama.cpp ÷ hf):
  seq-1    one request, sequential mode
  seq-16   16 concurrent requests, sequential mode
  fork-4   one request whose block forks 4 equal branches (parallel mode)
and, on llama.cpp, the parallel speedup at n=4 (the 4 branches forked vs the same tokens decoded one after
another) divided by the ideal speedup (total / critical-path tokens). Runs alternate between the backends
and report medians, so machine load hits both alike. Not part of the tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.scripted: the forcing processor

from benchmarks.engine_speed import machine  # noqa: E402
from npr.engine import SamplingParams, load_engine  # noqa: E402
from tests.scripted import Script  # noqa: E402

DEMO_SEED = str(Path(__file__).resolve().parents[1] / "src" / "npr" / "assets" / "demo_seed")


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer(f"Question {i}: what is {i} plus {2 * i}?", add_special_tokens=False)["input_ids"]
        for i in range(n)
    ]


def timed(engine, ps, params, mode) -> tuple[float, int, int]:
    """Seconds, generated tokens and critical-path tokens of one generate call."""
    start = time.perf_counter()
    out = engine.generate(ps, params, mode=mode)
    return (
        time.perf_counter() - start,
        sum(r.stats.total_tokens for r in out),
        max(r.stats.critical_path_tokens for r in out),
    )


def no_eos(eos: int):
    """Every request decodes its whole budget, so tokens/s is measured at the batch size asked for."""

    def processor(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[eos] = float("-inf")
        return logits

    return processor


def cases(tokenizer, tokens: int) -> dict[str, tuple[list[list[int]], SamplingParams, str]]:
    free = SamplingParams(
        temperature=0.0,
        max_new_tokens=tokens,
        branch_repetition_penalty=1.0,
        logits_processors=[no_eos(tokenizer.eos_token_id)],
    )
    fork = SamplingParams(
        temperature=0.0, max_new_tokens=8 * tokens, logits_processors=[Script(tokenizer, [[tokens] * 4])]
    )
    chain = SamplingParams(
        temperature=0.0, max_new_tokens=8 * tokens, logits_processors=[Script(tokenizer, [[4 * tokens]])]
    )
    return {
        "seq-1": (prompts(tokenizer, 1), free, "sequential"),
        "seq-16": (prompts(tokenizer, 16), free, "sequential"),
        "fork-4": (prompts(tokenizer, 1), fork, "parallel"),
        "chain-4": (prompts(tokenizer, 1), chain, "parallel"),  # the same branch tokens, one after another
    }


def bench(name: str, model: str, tokens: int, repeats: int, threads: int) -> None:
    hf = load_engine(model, "hf")
    llama = load_engine(model, "llamacpp", n_threads=threads, n_ctx=16384)
    print(f"\n## {name} ({model}), {tokens} tokens per branch/request, median of {repeats}")
    print("| case | hf tok/s | llama.cpp tok/s | llama.cpp ÷ hf |")
    print("|---|---|---|---|")
    runs: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
    for case, (ps, params, mode) in cases(hf.tokenizer, tokens).items():
        for engine in (hf, llama):
            engine.generate(ps[:1], SamplingParams(max_new_tokens=4), mode="sequential")  # warm up
        for _ in range(repeats):
            for engine in (hf, llama):  # interleaved: load bursts hit both
                runs.setdefault((case, engine.backend), []).append(timed(engine, ps, params, mode))
        rate = {b: statistics.median(n / s for s, n, _ in runs[case, b]) for b in ("hf", "llamacpp")}
        print(
            f"| {case} | {rate['hf']:.1f} | {rate['llamacpp']:.1f} | {rate['llamacpp'] / rate['hf']:.2f}× |"
        )
    fork = statistics.median(s for s, _, _ in runs["fork-4", "llamacpp"])
    chain = statistics.median(s for s, _, _ in runs["chain-4", "llamacpp"])
    _, total, path = runs["fork-4", "llamacpp"][0]
    ideal = total / path
    print(
        f"\nllama.cpp n=4: forked {fork:.2f} s vs one after another {chain:.2f} s: speedup {chain / fork:.2f}× "
        f"of ideal {ideal:.2f}× (total {total} / critical path {path} tokens) = {chain / fork / ideal:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the tiny test model only, few tokens")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request / per branch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--models", default="smollm2,seed", help="comma-separated: smollm2, seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine("cpu"), f"; llama.cpp threads {args.threads}")
    models = (
        {"tiny": "tiny"} if args.quick else {"SmolLM2-135M": "smollm2-135m-instruct", "demo seed": DEMO_SEED}
    )
    for name, model in models.items():
        bench(name, model, 8 if args.quick else args.tokens, 1 if args.quick else args.repeats, args.threads)


if __name__ == "__main__":
    main()
