"""`evaluate`: decode a dataset k times per problem, score it, measure it, and write the results.

One run decodes every problem × k samples through one engine, continuous-batching style (all requests are
queued; the engine admits them as room frees up), timed from the first step to the last token. A sequential
baseline reruns the same problems with the same engine and settings right after, so the speedups compare two
runs measured in one process on one machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from npr.data import Example, PromptStyle, build_prompt
from npr.engine import (
    Engine,
    Mode,
    RequestHandle,
    Rollout,
    SamplingParams,
    add_requests,
    run_to_completion,
)
from npr.eval.metrics import RunMetrics, Speedup, format_valid, run_metrics, speedup
from npr.eval.report import write_outputs
from npr.rewards import AnswerCheck, accuracy_reward_batch

PAPER_TEMPERATURE = 1.0
"""Sampling temperature of the paper's evaluation (DESIGN §7)."""
PAPER_TOP_P = 0.7
"""Nucleus mass of the paper's evaluation (DESIGN §7)."""
PAPER_K = 8
"""Samples per problem on small benchmarks in the paper (1 on large ones; DESIGN §7)."""
DEFAULT_MAX_NEW_TOKENS = 4096
"""Ours: the token budget over all branches of one answer outside a protocol (the paper's is
`npr.eval.protocol.PAPER_MAX_NEW_TOKENS`, too long for a quick run)."""
WARMUP_TOKENS = 8
"""Tokens of the untimed warm-up decode (first-call costs such as kernel setup stay out of TPS)."""


def paper_params(k: int = PAPER_K, **overrides: Any) -> SamplingParams:
    """The paper's eval sampling settings (T 1.0, top-p 0.7) with our budget; keyword arguments override."""
    settings: dict[str, Any] = {
        "temperature": PAPER_TEMPERATURE,
        "top_p": PAPER_TOP_P,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    }
    return SamplingParams(n=k, **{**settings, **overrides})


@dataclass
class RunResult:
    """One mode's run: its metrics, one record per problem, and the rollouts (problem-major)."""

    metrics: RunMetrics
    records: list[dict[str, Any]]
    rollouts: list[Rollout]


@dataclass
class EvalResult:
    """What `evaluate` returns; ``speedup`` is set when a sequential baseline ran."""

    settings: dict[str, Any]
    run: RunResult
    baseline: RunResult | None = None
    speedup: Speedup | None = None
    out_dir: Path | None = None

    @property
    def metrics(self) -> RunMetrics:
        return self.run.metrics

    def summary(self) -> dict[str, Any]:
        """The JSON summary: settings, metrics of the run and of the baseline, speedups."""
        return {
            "settings": self.settings,
            "metrics": self.run.metrics.to_dict(),
            "baseline": self.baseline.metrics.to_dict() if self.baseline else None,
            "speedup": self.speedup.to_dict() if self.speedup else None,
        }


def _params_dict(params: SamplingParams) -> dict[str, Any]:
    """The sampling settings as JSON (logits processors are code, so they are only counted)."""
    d = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "logits_processors"}
    return {**d, "stop": list(params.stop), "logits_processors": len(params.logits_processors)}


def _decode(
    engine: Engine, prompts: Sequence[list[int]], params: SamplingParams, mode: Mode, progress: bool
) -> tuple[list[Rollout], float]:
    """All prompts × n samples, queued at once; the bar advances when a problem's last sample finishes.

    On any error (a prompt too long, Ctrl-C) the requests still open are cancelled, so the engine stays usable.
    """
    start = time.perf_counter()
    left = [params.n] * len(prompts)
    with tqdm(total=len(prompts), desc=f"eval {mode}", unit="problem", disable=not progress) as bar:

        def finished(handle: RequestHandle) -> None:
            left[handle.index] -= 1
            if left[handle.index] == 0:
                bar.update()

        rollouts = run_to_completion(engine, add_requests(engine, prompts, params, mode), on_finish=finished)
    return rollouts, time.perf_counter() - start


def _records(
    examples: Sequence[Example], rollouts: Sequence[Rollout], correct: Sequence[Sequence[bool]], k: int
) -> list[dict[str, Any]]:
    """One JSON-ready record per problem, with every sample's answer, verdict, tokens and latency."""
    records = []
    for i, (ex, row) in enumerate(zip(examples, correct, strict=True)):
        samples = [
            {
                "answer": r.answer,
                "correct": ok,
                "format_valid": format_valid(r.text),
                "total_tokens": r.stats.total_tokens,
                "critical_path_tokens": r.stats.critical_path_tokens,
                "forks": r.stats.forks,
                "branches": r.stats.branches,
                "finish_reason": r.finish_reason.value,
                "latency_s": r.stats.wall_time,
            }
            for r, ok in zip(rollouts[i * k : (i + 1) * k], row, strict=True)
        ]
        records.append(
            {"id": ex.id, "question": ex.question, "gold": ex.answer, "correct": sum(row), "samples": samples}
        )
    return records


@dataclass(frozen=True)
class PromptSpec:
    """Which instruction the prompts carry: the format one (None: iff decoding in parallel) and its style.

    ``template`` goes to the chat template (``{"enable_thinking": False}`` for a Qwen3 non-thinking model);
    ``tags_as_ids`` as in :func:`npr.data.build_prompt` (default: only for the ``official`` style).
    """

    format: bool | None = None
    style: PromptStyle = "full"
    template: Mapping[str, Any] = field(default_factory=dict)
    tags_as_ids: bool | None = None

    def build(self, engine: Engine, question: str, mode: Mode) -> list[int]:
        parallel = mode == "parallel" if self.format is None else self.format
        return build_prompt(
            engine.tokenizer,
            question,
            parallel=parallel,
            style=self.style,
            template=self.template,
            tags_as_ids=self.tags_as_ids,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "template": dict(self.template)}


def _run(
    engine: Engine,
    examples: Sequence[Example],
    params: SamplingParams,
    mode: Mode,
    verifier: AnswerCheck | None,
    progress: bool,
    prompt: PromptSpec,
) -> RunResult:
    """Decode, score (batched) and measure one mode."""
    prompts = [prompt.build(engine, ex.question, mode) for ex in examples]
    rollouts, wall = _decode(engine, prompts, params, mode, progress)
    golds = [ex for ex in examples for _ in range(params.n)]
    rewards = accuracy_reward_batch([r.text for r in rollouts], golds, check=verifier)
    k = params.n
    correct = [[x > 0 for x in rewards[i * k : (i + 1) * k]] for i in range(len(examples))]
    return RunResult(run_metrics(rollouts, correct, wall), _records(examples, rollouts, correct, k), rollouts)


def _warm_up(
    engine: Engine,
    example: Example,
    params: SamplingParams,
    modes: Sequence[Mode],
    prompt: PromptSpec,
) -> None:
    """A few untimed tokens per mode, so one-time costs do not land on whichever run goes first."""
    short = dataclasses.replace(params, n=1, max_new_tokens=WARMUP_TOKENS, max_path_tokens=None)
    for mode in modes:
        engine.generate([prompt.build(engine, example.question, mode)], short, mode)


@dataclass(frozen=True)
class LatencyRun:
    """One decoder to time: an engine (its model), the mode it decodes in and its prompts."""

    engine: Engine
    mode: Mode
    prompt: PromptSpec = PromptSpec()


def solo_latencies(
    runs: Mapping[str, LatencyRun],
    examples: Sequence[Example],
    params: SamplingParams,
    repeats: int = 1,
) -> dict[str, list[float]]:
    """Per run and problem: wall seconds to decode one sample with nothing else in the engine.

    Latency is what one user waits for one answer; in a batched run it also counts the other requests'
    compute, which on a small CPU hides the gain of decoding branches side by side. So it is measured at
    concurrency 1, after an untimed warm-up, and the runs take turns problem by problem, so a slow spell
    of a shared machine lands on every run alike. With `repeats` > 1 each time is the median of as many.
    """
    one = dataclasses.replace(params, n=1)
    if examples:
        for run in runs.values():
            _warm_up(run.engine, examples[0], one, [run.mode], run.prompt)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for ex in examples:
        tries: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                ids = run.prompt.build(run.engine, ex.question, run.mode)
                start = time.perf_counter()
                run.engine.generate([ids], one, run.mode)
                tries[name].append(time.perf_counter() - start)
        for name, t in tries.items():
            times[name].append(statistics.median(t))
    return times


def check_run(mode: str, baseline: str | None, k: int) -> None:
    """Reject a bad mode, baseline or k before any model is loaded."""
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
    if baseline not in (None, "sequential"):
        raise ValueError(f"baseline must be None or 'sequential', got {baseline!r}")
    if baseline == mode:
        raise ValueError("a sequential run needs no sequential baseline: use mode='parallel' or no baseline")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def evaluate(
    engine: Engine,
    dataset: Sequence[Example],
    k: int = PAPER_K,
    params: SamplingParams | None = None,
    mode: Mode = "parallel",
    baseline: Literal["sequential"] | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    verifier: AnswerCheck | None = None,
    *,
    warmup: bool = True,
    info: dict[str, Any] | None = None,
    prompt: PromptSpec | None = None,
) -> EvalResult:
    """Decode every problem k times in ``mode``, score and measure it (DESIGN §7); optionally write files.

    ``params`` defaults to :func:`paper_params`; its ``n`` is replaced by ``k``. ``baseline="sequential"``
    reruns the problems sequentially with the same settings and reports the speedups. ``verifier`` is a
    task's own ``check(response_text, example)`` (default: math-verify on the boxed answer). ``info``
    (model name, data spec …) is stored with the settings. ``prompt`` picks the instruction (default: the
    format one iff decoding in parallel, full style). With ``out_dir`` the files of
    :func:`npr.eval.report.write_outputs` are written there.
    """
    check_run(mode, baseline, k)
    if not dataset:
        raise ValueError("evaluate needs at least one problem, got an empty dataset")
    params = dataclasses.replace(params or paper_params(k), n=k)
    modes: list[Mode] = [mode] if baseline is None else [mode, baseline]
    prompt = prompt or PromptSpec()
    if warmup:
        _warm_up(engine, dataset[0], params, modes, prompt)
    runs = [_run(engine, dataset, params, m, verifier, progress, prompt) for m in modes]
    settings = {
        "mode": mode,
        "baseline": baseline,
        "k": k,
        "problems": len(dataset),
        "params": _params_dict(params),
        "verifier": getattr(verifier, "__name__", type(verifier).__name__) if verifier else "math-verify",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "info": info or {},
        "prompt": prompt.to_dict(),
    }
    result = EvalResult(settings, runs[0])
    if baseline is not None:
        result.baseline = runs[1]
        result.speedup = speedup(runs[0].metrics, runs[1].metrics)
    if out_dir is not None:
        result.out_dir = Path(out_dir)
        write_outputs(result, result.out_dir)
    return result
