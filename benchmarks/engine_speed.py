"""How fast the parallel engine decodes, on random models (nothing to download).

    python benchmarks/engine_speed.py            # the full run (minutes on a 2-core CPU)
    python benchmarks/engine_speed.py --quick    # a small run to check that it works

For each model it prints:
  (a) sequential-mode tokens/s ÷ Hugging Face `model.generate` tokens/s, greedy, on the same tokens (asserted);
  (b) n equal branches decoded in parallel vs the same number of tokens decoded one after another:
      measured speedup ÷ ideal speedup (ideal = total tokens / critical-path tokens);
  (c) tokens/s with many concurrent requests vs one;
  (d) peak KV bytes of the shared pool vs a design that copies the prefix into every branch.
Timings interleave the compared runs and report medians. Not part of the tests.
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import transformers
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from npr.engine import ParallelEngine, Rollout, SamplingParams
from npr.engine.kv import cache_kwarg
from npr.format import TagIds
from npr.model import tiny_model

T = TypeVar("T")
# Wall time, or this process's CPU time when it runs on one CPU thread: on a shared machine other jobs then
# cannot stretch a run (main() picks; the header says which).
clock = time.perf_counter
MODELS = {
    "h128-L2": dict(hidden_size=128, num_hidden_layers=2),
    "h512-L8": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        cpu += f"; GPU {torch.cuda.get_device_name(device)}"
    return (
        f"{cpu}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"transformers {transformers.__version__}; python {platform.python_version()}; device {device}"
    )


def force(logits: torch.Tensor, token: int) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    out[token] = 0.0
    return out


@dataclass
class Ban:
    """Greedy text without structure: tags and end-of-sequence never win."""

    ids: list[int]

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.ids] = float("-inf")
        return logits


@dataclass
class Fork:
    """Scripts one block of n equal branches of `branch_len` tokens (`<step>` to `</step>`), then a bare
    takeaway and end-of-sequence. Branch text is greedy with `ban`; everything else is forced."""

    prompt_len: int
    guideline: list[int]
    n: int
    branch_len: int
    tags: TagIds
    eos: int
    ban: Ban

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        i, g = len(visible) - self.prompt_len, len(self.guideline)
        if i < g:
            return force(logits, self.guideline[i])
        if i < g + self.branch_len:  # a branch sees the trunk and itself only
            return (
                force(logits, self.tags.step_close)
                if i == g + self.branch_len - 1
                else self.ban(visible, logits)
            )
        after = i - g - self.n * self.branch_len  # 1 = just after the forced <takeaway>
        return force(logits, self.tags.takeaway_close if after == 1 else self.eos)


@dataclass
class Setup:
    name: str
    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    tags: TagIds
    engine: ParallelEngine
    ban: Ban

    @classmethod
    def build(cls, name: str, device: str) -> Setup:
        model, tok = tiny_model(seed=0, **MODELS[name])
        model = model.to(device)
        tags = TagIds.from_tokenizer(tok)
        return cls(
            name, model, tok, tags, ParallelEngine(model, tok), Ban([*tags.as_tuple(), tok.eos_token_id])
        )

    def prompt(self, n_tokens: int, salt: int = 0) -> list[int]:
        words = " ".join(f"w{(salt * 7919 + i) % 97}" for i in range(n_tokens))
        return self.tok(words, add_special_tokens=False)["input_ids"][:n_tokens]

    def fork(self, prompt: list[int], n: int, branch_len: int) -> Fork:
        t, enc = self.tags, self.tok.encode
        guideline = [t.guideline_open]
        for i in range(1, n + 1):
            guideline += [t.plan_open, *enc(f"{i}: part {i}", add_special_tokens=False), t.plan_close]
        guideline.append(t.guideline_close)
        return Fork(len(prompt), guideline, n, branch_len, t, self.tok.eos_token_id, self.ban)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = clock()
    out = fn()
    return out, clock() - start


def interleaved(runs: Mapping[str, Callable[[], T]], reps: int) -> tuple[dict[str, T], dict[str, float]]:
    """One warm-up each, then `reps` rounds alternating the runs; median seconds per run."""
    results = {k: fn() for k, fn in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            results[k], dt = timed(fn)
            times[k].append(dt)
    return results, {k: statistics.median(v) for k, v in times.items()}


def greedy_params(max_new: int, proc) -> SamplingParams:
    """Greedy, no branch penalty (sequential runs have none), forks of any width the run asks for."""
    return SamplingParams(
        temperature=0.0,
        max_new_tokens=max_new,
        branch_repetition_penalty=1.0,
        max_plans=64,
        logits_processors=[proc],
    )


def greedy(s: Setup, prompts: list[list[int]], max_new: int, mode: str, proc=None) -> list[Rollout]:
    return s.engine.generate(prompts, greedy_params(max_new, proc or s.ban), mode=mode)


# ------------------------------------------------------------------------------------------------ measures


def vs_hf(s: Setup, args) -> list[tuple[str, str]]:
    """(a) Same greedy tokens from HF generate and from the engine's sequential mode."""
    prompt, n = s.prompt(args.hf_prompt), args.new_tokens
    ids = torch.tensor([prompt], device=s.engine.pool.device)

    def hf() -> list[int]:
        out = s.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            suppress_tokens=s.ban.ids,
        )
        return out[0, len(prompt) :].tolist()

    def ours() -> list[int]:
        return greedy(s, [prompt], n, "sequential")[0].token_ids

    results, secs = interleaved({"hf": hf, "engine": ours}, args.reps)
    a, b = results["hf"], results["engine"]
    assert a == b, f"{s.name}: HF and engine greedy tokens differ:\n{a}\n{b}"
    return [
        ("(a) HF generate tok/s", f"{n / secs['hf']:.0f}"),
        ("(a) engine sequential tok/s", f"{n / secs['engine']:.0f}"),
        ("(a) engine ÷ HF (identical tokens)", f"{secs['hf'] / secs['engine']:.2f}"),
    ]


def parallel_vs_sequential(s: Setup, args) -> list[tuple[str, str]]:
    """(b) and (d): n equal branches in one block vs the same total tokens decoded sequentially."""
    rows = []
    prompt = s.prompt(args.prefix, salt=1)
    for n in args.widths:
        fork = s.fork(prompt, n, args.branch_len)
        (par,) = greedy(s, [prompt], 100_000, "parallel", fork)
        assert par.stats.branches == n and par.finish_reason == "stop", (par.finish_reason, par.stop_reason)
        assert all(b.length == args.branch_len for b in par.blocks[0].branches)
        total, path = par.stats.total_tokens, par.stats.critical_path_tokens
        runs = {
            "parallel": lambda fork=fork: greedy(s, [prompt], 100_000, "parallel", fork),
            "sequential": lambda total=total: greedy(s, [prompt], total, "sequential"),
        }
        results, secs = interleaved(runs, args.reps)
        assert results["sequential"][0].stats.total_tokens == total
        speedup, ideal = secs["sequential"] / secs["parallel"], total / path
        rows.append(
            (
                f"(b) n={n}: speedup / ideal ({total} tok, path {path})",
                f"{speedup:.2f} / {ideal:.2f} = {speedup / ideal:.2f}",
            )
        )
        bound = model_bound(s, n, len(prompt) + path // 2)
        rows.append((f"(b) n={n}: model-only bound (forward ms 1 query ÷ {n} queries)", f"{bound:.2f}"))
        rows.append(kv_bytes(s, prompt, fork, n))
    return rows


def decode_forward(s: Setup, queries: int, context: int) -> float:
    """Seconds of one bare model forward adding `queries` tokens to a fresh `context`-token cache."""
    dev = s.engine.pool.device
    cache = {cache_kwarg(s.model): DynamicCache()}
    with torch.inference_mode():
        s.model(input_ids=torch.zeros(1, context, dtype=torch.long, device=dev), use_cache=True, **cache)
        ids = torch.zeros(1, queries, dtype=torch.long, device=dev)
        pos = torch.arange(context, context + queries, device=dev)[None]
        mask = torch.zeros(1, 1, queries, context + queries, device=dev)
        start = clock()
        s.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **cache)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start


def model_bound(s: Setup, n: int, context: int, reps: int = 15) -> float:
    """What a decode step costs with zero engine overhead decides how close (b) can get to its ideal: with n
    branches per step, at most forward(1 query) / forward(n queries). Measured interleaved, medians."""
    one, many = [], []
    for _ in range(reps):
        one.append(decode_forward(s, 1, context))
        many.append(decode_forward(s, n, context))
    return statistics.median(one) / statistics.median(many)


def kv_bytes(s: Setup, prompt: list[int], fork: Fork, n: int) -> tuple[str, str]:
    """(d) Peak pool bytes, stepped by hand, vs copying prompt + trunk into each of the n branches.

    bytes(tokens) = 2 (K, V) × layers × kv_heads × head_dim × dtype bytes × tokens
    shared pool at the block's end: P + g + n·L tokens;  copy per branch: n·(P + g + L) tokens
    (P prompt, g trunk up to </guideline>, L tokens per branch).
    """
    cfg = s.model.config
    per_token = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * s.engine.pool.dtype.itemsize
    )
    s.engine.add_request(prompt, greedy_params(100_000, fork))
    peak = 0
    while s.engine.has_work:
        s.engine.step()
        peak = max(peak, s.engine.pool.bytes_used())
    p, g, L = len(prompt), len(fork.guideline), fork.branch_len
    shared, copy = per_token * (p + g + n * L), per_token * n * (p + g + L)
    return (
        f"(d) n={n}: KV KiB: pool peak (formula at block end) vs copy-per-branch",
        f"{peak / 1024:.0f} ({shared / 1024:.0f}) vs {copy / 1024:.0f}: {copy / peak:.2f}x less",
    )


def concurrency(s: Setup, args) -> list[tuple[str, str]]:
    """(c) Plain greedy decoding, and forked decoding, for many concurrent requests vs one."""
    k, n_new = args.concurrency, args.new_tokens
    prompts = [s.prompt(args.hf_prompt, salt=i) for i in range(k)]
    forks = [s.fork(p, 4, n_new // 4) for p in prompts]

    def forked(ps: list[list[int]], fs: list[Fork]) -> list[Rollout]:
        by_prompt = {tuple(p): f for p, f in zip(ps, fs, strict=True)}
        return greedy(s, ps, 100_000, "parallel", lambda v, x: by_prompt[tuple(v[: len(ps[0])])](v, x))

    runs = {
        "plain 1": lambda: greedy(s, prompts[:1], n_new, "sequential"),
        f"plain {k}": lambda: greedy(s, prompts, n_new, "sequential"),
        "forked 1": lambda: forked(prompts[:1], forks[:1]),
        f"forked {k}": lambda: forked(prompts, forks),
    }
    results, secs = interleaved(runs, args.reps)
    rows = []
    for kind in ("plain", "forked"):
        rate = {
            c: sum(r.stats.total_tokens for r in results[f"{kind} {c}"]) / secs[f"{kind} {c}"] for c in (1, k)
        }
        label = "4 branches" if kind == "forked" else "no fork"
        rows.append(
            (
                f"(c) {kind} ({label}) tok/s: {k} requests vs 1",
                f"{rate[k]:.0f} vs {rate[1]:.0f} ({rate[k] / rate[1]:.1f}x)",
            )
        )
    return rows


def profile(s: Setup, args) -> None:
    prompt = s.prompt(args.prefix, salt=1)
    fork = s.fork(prompt, 4, args.branch_len)
    greedy(s, [prompt], 100_000, "parallel", fork)
    prof = cProfile.Profile()
    prof.runcall(greedy, s, [prompt], 100_000, "parallel", fork)
    print(f"\nprofile: {s.name}, one parallel n=4 run")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the engine")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, 0 = torch's default. 1 by default: these models' ops take microseconds, and "
        "on a shared CPU a second thread made both HF and the engine 7x slower",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256, help="(a), (c): tokens per request")
    ap.add_argument("--hf-prompt", type=int, default=32, help="(a), (c): prompt tokens")
    ap.add_argument("--prefix", type=int, default=128, help="(b), (d): prompt tokens before the fork")
    ap.add_argument("--branch-len", type=int, default=128, help="(b), (d): tokens per branch")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="cProfile one parallel n=4 run per model")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(reps=1, new_tokens=32, prefix=32, branch_len=16, widths=[2, 4], concurrency=4)
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    if args.device == "cpu" and torch.get_num_threads() == 1:
        clock = time.process_time
    print(f"{machine(args.device)}; times: {clock.__name__}")
    for name in args.models:
        s = Setup.build(name, args.device)
        cfg = s.model.config
        print(
            f"\n{name}: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, vocab {cfg.vocab_size}"
        )
        rows = vs_hf(s, args) + parallel_vs_sequential(s, args) + concurrency(s, args)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        if args.profile:
            profile(s, args)


if __name__ == "__main__":
    main()
