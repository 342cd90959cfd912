"""Training throughput: parallel SFT against causal SFT on the same batches (target: ratio >= 0.9), packed
against padded rows, FlexAttention against dense SDPA for the log-prob pass, and the demo seed's padding.

Each optimizer step is timed whole: collation (layout, mask), forward, loss, backward, AdamW step. Three
ways to train the same token ids:
- `parallel`: the layout's 4D mask and position ids (what `npr train sft` does for NPR-Beta);
- `causal_layout`: the sequential layout, i.e. the same code path with a causal 4D mask (the recipe's
  sequential baseline);
- `causal_plain`: a plain Hugging Face forward with a 2D padding mask (any ordinary SFT trainer), which
  lets attention use its causal fast path.
- `parallel_packed`: parallel SFT with the batch packed into rows of twice the mean length (no padding).
Steps of the modes are interleaved, so a busy machine slows them alike; the median step counts.

`--logprob 1024,4096,8192`: one row of that many tokens (synthetic NPR sequences packed back to back), a
forward-only log-prob pass with dense SDPA and a dense mask vs FlexAttention (transformers' compiled
wrapper) with a BlockMask, mask building included; tokens/s and peak resident memory of each (on CPU the
kernel's high-water mark, reset before each pass via /proc/self/clear_refs).

`--seed-padding N`: the padding share of the demo seed's SFT (its first N examples, the demo config's
batch size and max_len) with one padded sequence per row, and with packing into rows of max_len (the
default), 1024 and 2048 tokens.

    python benchmarks/train_speed.py                       # CPU, a small random Qwen3
    python benchmarks/train_speed.py --logprob 1024,4096,8192 --seed-padding 2048
    python benchmarks/train_speed.py --device cuda --hidden 1024 --layers 8 --batch 8 --blocks 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from npr.attention import use_attention
from npr.format import Block, Item, TagIds, Trajectory, render
from npr.model import tiny_model
from npr.train.losses import sft_loss
from npr.train.packing import pack, padding_share, plan_micro_batches
from npr.train.sequences import encode_response, forward_logprobs, make_batch, sft_example

MODES = ("parallel", "parallel_packed", "causal_layout", "causal_plain")


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
        lengths = [len(p) + len(r) for p, r in pairs]
        rows = pack(lengths, 2 * sum(lengths) // len(lengths)) if mode == "parallel_packed" else None
        batch = make_batch(
            [
                sft_example(p, r, parallel=mode != "causal_layout" and mode != "causal_plain")
                for p, r in pairs
            ],
            tags,
            pad_id,
            dtype=model.dtype,
            rows=rows,
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
        "packed_over_padded": rate["parallel_packed"] / rate["parallel"],
    }


def _peak_rss_reset() -> int:
    """Reset the process's resident high-water mark; returns the current resident bytes.

    Freed memory is first handed back to the system (and large blocks are always mapped afresh, see
    `logprob_speed`), so that what a pass allocates shows up as new resident pages.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1])


def logprob_speed(args: argparse.Namespace, lengths: list[int]) -> dict:
    """Forward-only log-prob pass over one packed row of L tokens: dense SDPA vs FlexAttention."""
    device = torch.device(args.device)
    if device.type == "cpu":  # glibc M_MMAP_THRESHOLD fixed at 64 KiB: big blocks are unmapped when freed
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    shape = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads}
    shape["num_key_value_heads"] = args.heads // 2
    models = {}
    for kind in ("dense", "flex"):
        model, tokenizer = tiny_model(seed=0, **shape)
        use_attention(model, kind)
        models[kind] = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    tags = TagIds.from_tokenizer(tokenizer)
    pairs = examples(tokenizer, 4 * max(lengths) // 300 + 4, args.blocks, args.words)
    out: dict = {}
    for n in lengths:
        row, used = [], 0
        for p, r in pairs:
            if used + len(p) + len(r) > n:
                break
            row.append(sft_example(p, r))
            used += len(p) + len(r)
        batch = make_batch(row, tags, tokenizer.pad_token_id, rows=[list(range(len(row)))]).to(device)
        pad = n - batch.layout.input_ids.shape[1]
        result = {}
        for kind, model in models.items():
            with torch.no_grad():
                fresh = make_batch(row, tags, tokenizer.pad_token_id, rows=[list(range(len(row)))]).to(device)
                forward_logprobs(model, fresh, kind)  # warm-up (flex compiles its kernel here)
                times, peaks = [], []
                for _ in range(args.logprob_repeats):
                    base = _peak_rss_reset() if device.type == "cpu" else 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    began = time.perf_counter()
                    fresh = make_batch(row, tags, tokenizer.pad_token_id, rows=[list(range(len(row)))])
                    forward_logprobs(model, fresh.to(device), kind)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        peaks.append(torch.cuda.max_memory_allocated(device))
                    else:
                        peaks.append(_status_kib("VmHWM") * 1024 - base)
                    times.append(time.perf_counter() - began)
            result[kind] = {"tokens_per_s": used / statistics.median(times), "peak_mib": max(peaks) / 2**20}
        out[str(n)] = {
            "real_tokens": used,
            "padding": pad,
            **result,
            "flex_over_dense_tokens_per_s": result["flex"]["tokens_per_s"] / result["dense"]["tokens_per_s"],
            "flex_over_dense_peak_memory": result["flex"]["peak_mib"] / result["dense"]["peak_mib"],
        }
        del batch
    return out


def seed_padding(count: int) -> dict:
    """Padding share of the demo seed's SFT steps: padded rows vs packed rows (the demo config's sizes)."""
    import tempfile
    from importlib.resources import files

    from npr.pipeline.config import load_pipeline_config
    from npr.pipeline.stages import Pipeline
    from npr.train.sft import load_sft_examples

    config = load_pipeline_config(str(files("npr").joinpath("assets", "demo.yaml")))
    seed = config.seed_model
    config = config.model_copy(update={"seed_model": seed.model_copy(update={"examples": count})})
    pipeline = Pipeline(config, log=lambda _: None)
    sft = pipeline.sft_config("seed", "model", "data.jsonl")
    _, tokenizer = tiny_model(seed=config.seed, **seed.init)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.jsonl"
        pipeline.seed_data(path, tokenizer)
        loaded, _ = load_sft_examples(
            path, tokenizer, parallel=False, max_len=sft.max_len, style=sft.prompt_style
        )
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in loaded]
    order = random.Random(0).sample(range(len(lengths)), len(lengths))
    default = sft.max_tokens_per_row or sft.max_len
    share: dict[str, float] = {}
    for name, capacity in [
        ("padded", default),
        ("packed", default),
        ("packed_1024", 1024),
        ("packed_2048", 2048),
    ]:
        batches = []
        for start in range(0, len(order) - sft.batch_size + 1, sft.batch_size):
            step = [lengths[i] for i in order[start : start + sft.batch_size]]
            passes = plan_micro_batches(
                step,
                packing=name != "padded",
                capacity=capacity,
                rows_per_batch=max(1, sft.micro_batch_tokens // capacity),
                batch_size=sft.batch_size,
            )
            batches += [[[start + i for i in row] for row in micro] for micro in passes]
        share[name] = padding_share(batches, [lengths[i] for i in order])
    return {
        "examples": len(lengths),
        "mean_tokens": statistics.mean(lengths),
        "batch_size": sft.batch_size,
        "max_len": sft.max_len,
        "padding_share": share,
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
    parser.add_argument(
        "--logprob", default="", help="Row lengths for the flex vs dense pass, e.g. 1024,4096."
    )
    parser.add_argument("--logprob-repeats", type=int, default=3)
    parser.add_argument(
        "--seed-padding", type=int, default=0, help="Demo seed examples to measure padding on."
    )
    parser.add_argument("--skip-sft", action="store_true", help="Only the log-prob and padding parts.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"machine": _cpu_name(), "torch": torch.__version__}
    if not args.skip_sft:
        report["sft"] = sft_speed(args)
    if args.logprob:
        report["logprob"] = logprob_speed(args, [int(n) for n in args.logprob.split(",")])
    if args.seed_padding:
        report["seed_padding"] = seed_padding(args.seed_padding)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
