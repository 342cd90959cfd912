"""Training throughput: parallel SFT against causal SFT on the same batches (target: ratio >= 0.9).

Each optimizer step is timed whole: collation (layout, mask), forward, loss, backward, AdamW step. Three
ways to train the same token ids:
- `parallel`: the layout's 4D mask and position ids (what `npr train sft` does for NPR-Beta);
- `causal_layout`: the sequential layout, i.e. the same code path with a causal 4D mask (the recipe's
  sequential baseline);
- `causal_plain`: a plain Hugging Face forward with a 2D padding mask (any ordinary SFT trainer), which
  lets attention use its causal fast path.
Steps of the three modes are interleaved, so a busy machine slows them alike; the median step counts.

    python benchmarks/train_speed.py                       # CPU, a small random Qwen3
    python benchmarks/train_speed.py --device cuda --hidden 1024 --layers 8 --batch 8 --blocks 3
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from npr.format import Block, Item, TagIds, Trajectory, render
from npr.model import tiny_model
from npr.train.losses import sft_loss
from npr.train.sequences import encode_response, make_batch, sft_example

MODES = ("parallel", "causal_layout", "causal_plain")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        rng.choice(["add", "seven", "so", "then", "we", "count", "the", "sum", "is"]) for _ in range(n)
    )


def synthetic_trace(rng: random.Random, blocks: int, words: int) -> str:
    """A canonical response with `blocks` blocks of 2–4 branches, each step about `words` words long."""
    out = []
    for _ in range(blocks):
        n = rng.randint(2, 4)
        plans = tuple(Item(str(i), _words(rng, 6)) for i in range(1, n + 1))
        steps = tuple(Item(str(i), _words(rng, rng.randint(words // 2, words))) for i in range(1, n + 1))
        out.append(Block(plans, steps, _words(rng, 10)))
    return render(Trajectory(tuple(out), "so \\boxed{7}"))


def examples(
    tokenizer, count: int, blocks: int, words: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) id pairs shared by every mode."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        prompt = tokenizer(f"problem {i}: {_words(rng, 20)}")["input_ids"]
        pairs.append((prompt, encode_response(tokenizer, synthetic_trace(rng, blocks, words))))
    return pairs


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {len(names)} cores"


def _step_fn(mode: str, model, optimizer, tags: TagIds, pad_id: int, device) -> Callable[[list], int]:
    def step(pairs: list) -> int:
        batch = make_batch(
            [sft_example(p, r, parallel=mode == "parallel") for p, r in pairs],
            tags,
            pad_id,
            dtype=model.dtype,
        ).to(device)
        lay = batch.layout
        if mode == "causal_plain":
            logits = model(input_ids=lay.input_ids, attention_mask=lay.token_mask.long()).logits
        else:
            logits = model(
                input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=lay.attention_mask
            ).logits
        sft_loss(logits, lay.input_ids, batch.loss_mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(lay.token_mask.sum())

    return step


def sft_speed(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model, tokenizer = tiny_model(
        seed=0,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
    )
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).train()
    tags = TagIds.from_tokenizer(tokenizer)
    pairs = examples(tokenizer, args.batch * args.steps, args.blocks, args.words)
    batches = [pairs[i * args.batch : (i + 1) * args.batch] for i in range(args.steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    steps = {mode: _step_fn(mode, model, optimizer, tags, tokenizer.pad_token_id, device) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: dict[str, list[int]] = {mode: [] for mode in MODES}
    for i, batch in enumerate(batches):
        for mode in MODES:
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            n = steps[mode](batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - began)
                tokens[mode].append(n)
    rate = {mode: statistics.mean(tokens[mode]) / statistics.median(times[mode]) for mode in MODES}
    lengths = [len(p) + len(r) for p, r in pairs]
    return {
        "machine": _cpu_name(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "dtype": args.dtype},
        "batch": args.batch,
        "timed_steps": args.steps - args.warmup,
        "mean_sequence_tokens": statistics.mean(lengths),
        "tokens_per_s": rate,
        "median_step_s": {mode: statistics.median(times[mode]) for mode in MODES},
        "parallel_over_causal_plain": rate["parallel"] / rate["causal_plain"],
        "parallel_over_causal_layout": rate["parallel"] / rate["causal_layout"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="Steps per mode, warm-up included.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2, help="Blocks per synthetic response.")
    parser.add_argument("--words", type=int, default=40, help="Longest step, in words.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(sft_speed(args), indent=2))


if __name__ == "__main__":
    main()
