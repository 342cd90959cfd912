"""GPU readiness check on SmolLM2-135M-Instruct and a random ~0.5B Qwen3, in one run that fits 8 minutes.

Per model: engine parity in float32 and bf16 (max |engine − trainer| log-prob over sampled tokens), engine
speedup of parallel over sequential decoding with scripted forks of n = 2/4/8 branches, sequential tokens/s
of the engine against HF `generate`, parallel-SFT and PAPO step throughput, and peak memory of each part.
Every part is run on its own: an error is printed and recorded in the table, and the run goes on.

    python benchmarks/gpu_check.py          # CUDA
    python benchmarks/gpu_check.py --cpu    # a reduced run on CPU, to know that the script works

The first run on a machine converts SmolLM2's GGUF into the model cache (about a minute, on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.metadata
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.scripted makes any model fork on cue

from npr.data import encode_messages  # noqa: E402
from npr.engine import FinishReason, ParallelEngine, Rollout, SamplingParams  # noqa: E402
from npr.engine.core import Mode  # noqa: E402
from npr.format import TagIds  # noqa: E402
from npr.hub import SMOLLM2  # noqa: E402
from npr.model import ATTN_IMPLEMENTATION, load_model, tiny_model  # noqa: E402
from npr.train.losses import papo_loss, sft_loss  # noqa: E402
from npr.train.sequences import (  # noqa: E402
    TrainBatch,
    forward_logprobs,
    make_batch,
    rollout_example,
    sft_example,
)
from tests.scripted import Script  # noqa: E402

QUESTION = [{"role": "user", "content": "What is 2 + 3? Think in parallel steps."}]

# Shaped like Qwen3-0.6B but 24 layers: about 0.48B parameters with a 49k vocabulary.
QWEN_05B = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
)
QWEN_CPU = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=768,
)


@dataclass(frozen=True)
class Scale:
    """How much work each part does (the CPU run is a reduced version of the GPU one)."""

    qwen: dict[str, Any]
    parity_forks: list[list[int]]  # free tokens per branch of each block in the parity rollouts
    speed_dtype: torch.dtype  # engine speed and HF generate run in this dtype
    branch_tokens: int  # free tokens per branch in the speedup runs
    samples: int  # samples per prompt decoded together in the speedup and throughput runs
    generate_tokens: int  # new tokens per sample, engine vs HF generate
    train_batch: int
    train_steps: int
    widths: tuple[int, ...] = (2, 4, 8)


GPU = Scale(
    QWEN_05B,
    [[3, 6, 4], [5, 2]],
    torch.bfloat16,
    branch_tokens=96,
    samples=4,
    generate_tokens=128,
    train_batch=8,
    train_steps=5,
)
CPU = Scale(
    QWEN_CPU,
    [[2, 3]],
    torch.float32,
    branch_tokens=6,
    samples=1,
    generate_tokens=12,
    train_batch=2,
    train_steps=1,
)


@dataclass
class Report:
    """Rows of (model, check, result, peak memory); errors become rows too."""

    device: torch.device
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def peak(self) -> str:
        """Peak GPU memory of the current part; on CPU the process's resident high-water mark so far."""
        if self.device.type == "cuda":
            return f"{torch.cuda.max_memory_allocated(self.device) / 2**20:,.0f} MiB"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB RSS"

    @contextlib.contextmanager
    def part(self, model: str, check: str) -> Iterator[Callable[[str], None]]:
        """Run one part; `add(result)` records a row; an exception is printed and recorded, then swallowed."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()

        def add(result: str) -> None:
            self.rows.append((model, check, result, self.peak()))
            print(f"  {model:22} {check:27} {result}", flush=True)

        try:
            yield add
        except Exception as error:  # one failing part must not hide the others
            traceback.print_exc()
            add(f"ERROR {type(error).__name__}: {error}"[:160])
        finally:
            print(f"  {'':22} {'':27} ({time.perf_counter() - start:.1f} s)", flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def table(self) -> str:
        header = ("model", "check", "result", "peak memory")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        lines = [header, tuple("-" * w for w in widths), *self.rows]
        return "\n".join(
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in lines
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    lines = [
        f"cpu: {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {importlib.metadata.version('transformers')}, npr {importlib.metadata.version('npr')}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- models


def random_qwen(tokenizer, settings: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """A random float32 Qwen3 over `tokenizer` (tags included), built directly on `device`."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **settings,
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    torch.manual_seed(0)
    with device:
        model = Qwen3ForCausalLM(config).float()
    return model.eval()


def parameters(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters"


# ---------------------------------------------------------------------------------------------- parts


def scripted(tokenizer, forks: list[list[int]], samples: int, budget: int) -> SamplingParams:
    """Sampling settings whose logits processor forces blocks of `forks[b][i]` free tokens per branch."""
    return SamplingParams(
        n=samples,
        seed=0,
        max_new_tokens=budget,
        max_plans=max(map(len, forks)),
        logits_processors=[Script(tokenizer, forks)],
    )


def decode(engine: ParallelEngine, params: SamplingParams, mode: Mode) -> list[Rollout]:
    rollouts = engine.generate([QUESTION], params, mode=mode)
    bad = {r.finish_reason.value for r in rollouts if r.finish_reason != FinishReason.STOP}
    if bad:
        raise RuntimeError(f"{mode} rollouts did not stop cleanly: {sorted(bad)}")
    return rollouts


def batch_of(examples: list, tags: TagIds, pad_id: int, device: torch.device) -> TrainBatch:
    return make_batch(examples, tags, pad_id).to(device)


def parity_error(
    model, tokenizer, tags: TagIds, device: torch.device, forks: list[list[int]], mode: Mode
) -> torch.Tensor:
    """|engine − one layout forward| log-prob of each sampled token of scripted rollouts, flat."""
    engine = ParallelEngine(model, tokenizer)
    rollouts = decode(engine, scripted(tokenizer, forks, 2, 400), mode)
    batch = batch_of([rollout_example(r) for r in rollouts], tags, tokenizer.pad_token_id, device)
    with torch.no_grad():
        reference = forward_logprobs(model, batch)
    return (reference - batch.old_logprobs).abs()[batch.loss_mask.bool()]


def check_parity(
    report: Report, name: str, model, tokenizer, tags: TagIds, scale: Scale, dtype: torch.dtype
) -> None:
    label = str(dtype).removeprefix("torch.")
    modes: tuple[Mode, ...] = ("parallel", "sequential")
    for mode in modes:
        with report.part(name, f"parity {label} {mode}") as add:
            error = parity_error(model, tokenizer, tags, report.device, scale.parity_forks, mode)
            add(
                f"|dlogp| max {error.max().item():.2e}, mean {error.mean().item():.2e} over {len(error)} tokens"
            )


def check_speedup(report: Report, name: str, model, tokenizer, scale: Scale) -> None:
    """Wall time of the same scripted answers decoded in parallel and sequentially."""
    engine = ParallelEngine(model, tokenizer)
    decode(engine, scripted(tokenizer, [[2, 2]], 1, 100), "parallel")  # warm-up
    for width in scale.widths:
        with report.part(name, f"speedup n={width}") as add:
            forks = [[scale.branch_tokens] * width]
            params = scripted(tokenizer, forks, scale.samples, 2 * width * scale.branch_tokens + 200)
            par, par_s = timed(report.device, functools.partial(decode, engine, params, "parallel"))
            _, seq_s = timed(report.device, functools.partial(decode, engine, params, "sequential"))
            tokens = sum(r.stats.total_tokens for r in par)
            path = sum(r.stats.critical_path_tokens for r in par) / len(par)
            add(
                f"{seq_s / par_s:.2f}x (parallel {par_s:.2f} s, sequential {seq_s:.2f} s; "
                f"{scale.samples}x{tokens // scale.samples} tokens, critical path {path:.0f})"
            )


def check_generate(report: Report, name: str, model, tokenizer, scale: Scale) -> None:
    """Sequential decoding of exactly `generate_tokens` greedy tokens per sample: engine vs HF generate."""
    engine = ParallelEngine(model, tokenizer)
    eos = sorted(engine.eos_ids)

    def no_eos(_visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[eos] = float("-inf")
        return logits

    n, new = scale.samples, scale.generate_tokens
    prompt = encode_messages(tokenizer, QUESTION)
    with report.part(name, f"sequential tok/s (B={n})") as add:
        params = SamplingParams(n=n, temperature=0.0, max_new_tokens=new, logits_processors=[no_eos])
        engine.generate([prompt], SamplingParams(n=n, temperature=0.0, max_new_tokens=4), mode="sequential")
        rollouts, engine_s = timed(
            report.device, lambda: engine.generate([prompt], params, mode="sequential")
        )
        assert all(r.stats.total_tokens == new for r in rollouts), "the engine stopped early"
        ids = torch.tensor([prompt] * n, device=report.device)
        settings = dict(
            do_sample=False, pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(ids)
        )
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **settings)
        _, hf_s = timed(
            report.device, lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **settings)
        )
        engine_tps, hf_tps = n * new / engine_s, n * new / hf_s
        add(f"engine {engine_tps:,.0f} vs HF generate {hf_tps:,.0f} tok/s ({engine_tps / hf_tps:.2f}x)")


def check_training(report: Report, name: str, model, tokenizer, tags: TagIds, scale: Scale) -> None:
    """Throughput of full AdamW steps (bf16 autocast on CUDA) on scripted 4-branch rollouts."""
    engine = ParallelEngine(model, tokenizer)
    forks = [[scale.branch_tokens] * 4]
    rollouts = decode(
        engine, scripted(tokenizer, forks, scale.train_batch, 8 * scale.branch_tokens + 200), "parallel"
    )
    del engine
    device = report.device
    sft = batch_of(
        [sft_example(r.prompt_ids, r.token_ids) for r in rollouts], tags, tokenizer.pad_token_id, device
    )
    rl = batch_of([rollout_example(r) for r in rollouts], tags, tokenizer.pad_token_id, device)
    advantages = torch.linspace(-1, 1, len(rollouts), device=device)

    def sft_step() -> torch.Tensor:
        lay = sft.layout  # under autocast, SDPA casts the float32 mask with q, k, v
        logits = model(
            input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=lay.attention_mask
        ).logits
        return sft_loss(logits, lay.input_ids, sft.loss_mask)

    def papo_step() -> torch.Tensor:
        return papo_loss(forward_logprobs(model, rl), advantages, rl.loss_mask)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for label, loss_fn, batch in (("SFT", sft_step, sft), ("PAPO", papo_step, rl)):
        with report.part(name, f"{label} step (B={len(rollouts)})") as add:
            train_steps(optimizer, loss_fn, 1, device)  # warm-up; allocates the optimizer state
            steps = scale.train_steps
            _, seconds = timed(device, functools.partial(train_steps, optimizer, loss_fn, steps, device))
            tokens = int(batch.layout.token_mask.sum())
            add(f"{tokens * steps / seconds:,.0f} tok/s ({seconds / steps:.2f} s/step of {tokens} tokens)")
    model.eval()


def train_steps(
    optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], steps: int, device: torch.device
) -> None:
    """`steps` optimizer steps on `loss_fn`, its forward under bf16 autocast on CUDA."""
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def check_model(report: Report, name: str, model, tokenizer, scale: Scale) -> None:
    tags = TagIds.from_tokenizer(tokenizer)
    check_parity(report, name, model, tokenizer, tags, scale, torch.float32)
    half = copy.deepcopy(model).to(torch.bfloat16)
    check_parity(report, name, half, tokenizer, tags, scale, torch.bfloat16)
    fast = half if scale.speed_dtype == torch.bfloat16 else model
    check_speedup(report, name, fast, tokenizer, scale)
    check_generate(report, name, fast, tokenizer, scale)
    del half, fast
    gc.collect()
    check_training(report, name, model, tokenizer, tags, scale)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="a reduced run on CPU")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device; run with --cpu for the reduced CPU check")
    device = torch.device("cpu" if args.cpu else "cuda")
    scale = CPU if args.cpu else GPU
    report = Report(device)
    started = time.perf_counter()
    print(machine(device), flush=True)
    tokenizer = None
    with report.part(SMOLLM2, "load") as add:
        smollm, tokenizer = load_model(SMOLLM2, device=device)
        add(f"{parameters(smollm)}, {smollm.config.num_hidden_layers} layers")
    if tokenizer is not None:
        with report.part(SMOLLM2, "all checks"):  # records what the parts themselves do not catch
            check_model(report, SMOLLM2, smollm, tokenizer, scale)
        del smollm
        gc.collect()
    else:
        tokenizer = tiny_model()[1]  # the random model still runs on the tiny tokenizer
    name = "qwen3-rand"
    qwen = None
    with report.part(name, "build") as add:
        qwen = random_qwen(tokenizer, scale.qwen, device)
        add(f"{parameters(qwen)}, {scale.qwen['num_hidden_layers']} layers, vocab {len(tokenizer)}")
    if qwen is not None:
        with report.part(name, "all checks"):
            check_model(report, name, qwen, tokenizer, scale)
    print(f"\n{machine(device)}\ntotal {time.perf_counter() - started:.0f} s\n\n{report.table()}")


if __name__ == "__main__":
    main()
