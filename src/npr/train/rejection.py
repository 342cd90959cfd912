"""Stage 2, first half: rejection sampling from NPR-Zero (DESIGN §5).

Each problem gets K samples in sequential mode at T 1.0 (paper: K 8) with the prompt that asks for the
format; the first sample, in sample order, that is accepted is kept, and a problem with none is dropped.
A sample is accepted when it ended by itself (finish reason `stop`: SFT teaches the end-of-sequence token
after it), its format penalty is exactly 0 (`npr.format.check`) and its answer is correct (math-verify, or
the task's own `check`). Sample j of the problem at dataset index i uses seed `seed + i·K + j`, so the
result does not depend on how problems are batched, nor on where a run was interrupted.

Output: a JSONL of accepted samples `{id, question, answer, response, tries}` (what `npr train sft` reads)
and, next to it, `NAME.stats.json`: acceptance rate, a histogram of tries used, sample counts, and the
commit record that makes the output resumable. Problems are done in batches; after each batch its accepted
lines are appended to the JSONL and fsync'd, then the stats file is replaced atomically with the new done
set and the JSONL's committed length. A restarted run first cuts the JSONL back to that length, so a kill at
any point loses at most the batch in flight and never duplicates a line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from npr.data import Example, PromptStyle, build_prompt
from npr.engine import Engine, FinishReason, Rollout, SamplingParams, add_requests, run_to_completion
from npr.files import atomic_write
from npr.rewards import AnswerCheck, accuracy_reward_batch, format_penalty_batch

DEFAULT_K = 8  # paper (DESIGN §5): 8 tries per problem
DEFAULT_PROBLEMS_PER_BATCH = 16  # ours: K × 16 requests per engine batch


@dataclass
class RejectionStats:
    """Counts over the problems done so far; `tries[j]` = problems whose accepted sample was try j."""

    k: int
    problems: int = 0
    accepted: int = 0
    samples: int = 0
    well_formed: int = 0  # samples that stopped by themselves with format penalty 0
    correct: int = 0  # well-formed samples with a correct answer (only those are verified)
    tries: dict[int, int] = field(default_factory=dict)
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.problems - self.accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.problems if self.problems else 0.0

    @property
    def mean_tries(self) -> float:
        return sum(j * n for j, n in self.tries.items()) / self.accepted if self.accepted else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tries"] = {str(j): self.tries.get(j, 0) for j in range(1, self.k + 1)}
        return {
            **data,
            "dropped": self.dropped,
            "acceptance_rate": self.acceptance_rate,
            "mean_tries": self.mean_tries,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RejectionStats:
        names = {"k", "problems", "accepted", "samples", "well_formed", "correct", "finish_reasons"}
        tries = {int(j): n for j, n in data["tries"].items() if n}
        return cls(**{name: data[name] for name in names}, tries=tries)


def stats_path_for(out_path: str | Path) -> Path:
    """`samples.jsonl` → `samples.stats.json`."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.stats.json")


def problem_seed(seed: int, index: int, k: int) -> int:
    """Seed of the first sample of the problem at dataset `index` (sample j uses it + j)."""
    return seed + index * k


# ------------------------------------------------------------------------------------------------ commit log


@dataclass
class _Journal:
    """What the stats file commits: settings, counts, done problem ids, the JSONL's committed length."""

    settings: dict[str, Any]
    stats: RejectionStats
    done: list[str]
    output_bytes: int = 0

    def write(self, path: Path) -> None:
        data = {
            "settings": self.settings,
            "stats": self.stats.to_dict(),
            "output_bytes": self.output_bytes,
            "done": self.done,
        }
        atomic_write(path, json.dumps(data, indent=1))


def _open_journal(out: Path, stats_path: Path, settings: dict[str, Any]) -> _Journal:
    """Resume the run recorded in `stats_path` (cutting `out` back to its committed length) or start one."""
    if not stats_path.is_file():
        if out.is_file() and out.stat().st_size:
            raise FileExistsError(
                f"{out} exists but {stats_path.name} does not: not a resumable rejection-sampling output; "
                "delete it or write elsewhere"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"")
        journal = _Journal(settings, RejectionStats(k=settings["k"]), [])
        journal.write(stats_path)  # from now on the stats file is the truth about `out`
        return journal
    data = json.loads(stats_path.read_text(encoding="utf-8"))
    if data["settings"] != settings:
        raise ValueError(
            f"{stats_path}: cannot resume with different settings: was {data['settings']}, now {settings}"
        )
    committed = data["output_bytes"]
    size = out.stat().st_size if out.is_file() else 0
    if size < committed:
        raise ValueError(f"{out} has {size} bytes, fewer than the {committed} that {stats_path} records")
    with out.open("ab") as f:  # creates a missing (empty) output
        f.truncate(committed)  # drop lines of a batch that was not committed
    return _Journal(settings, RejectionStats.from_dict(data["stats"]), list(data["done"]), committed)


def _append(out: Path, lines: Sequence[str]) -> int:
    """Append lines and fsync; returns the file's new length."""
    with out.open("ab") as f:
        f.write("".join(lines).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


# ------------------------------------------------------------------------------------------------ sampling


def _sample(
    engine: Engine,
    problems: Sequence[tuple[int, Example]],
    params: SamplingParams,
    k: int,
    seed: int,
    style: PromptStyle,
) -> list[list[Rollout]]:
    """K sequential rollouts per problem, all problems decoded as one engine batch."""
    prompts = [build_prompt(engine.tokenizer, ex.question, parallel=True, style=style) for _, ex in problems]
    per_problem = [replace(params, n=k, seed=problem_seed(seed, index, k)) for index, _ in problems]
    indices = [index for index, _ in problems]
    rollouts = run_to_completion(engine, add_requests(engine, prompts, per_problem, "sequential", indices))
    return [rollouts[i : i + k] for i in range(0, len(rollouts), k)]


def _first_accepted(
    rollouts: list[list[Rollout]],
    examples: Sequence[Example],
    check: AnswerCheck | None,
    stats: RejectionStats,
) -> list[int | None]:
    """Per problem, the index of its first accepted sample (None if none); updates `stats`."""
    flat = [(p, j, r) for p, group in enumerate(rollouts) for j, r in enumerate(group)]
    penalties = format_penalty_batch([r.text for _, _, r in flat])
    formed = [
        (p, j, r)
        for (p, j, r), penalty in zip(flat, penalties, strict=True)
        if r.finish_reason == FinishReason.STOP and penalty == 0.0
    ]
    rewards = accuracy_reward_batch(
        [r.text for *_, r in formed], [examples[p] for p, *_ in formed], check=check
    )
    first: list[int | None] = [None] * len(rollouts)
    for (p, j, _), reward in zip(formed, rewards, strict=True):
        if reward > 0 and first[p] is None:  # `formed` is in sample order: the first hit is the first try
            first[p] = j
    for _, _, r in flat:
        stats.finish_reasons[r.finish_reason.value] = stats.finish_reasons.get(r.finish_reason.value, 0) + 1
    stats.samples += len(flat)
    stats.well_formed += len(formed)
    stats.correct += sum(reward > 0 for reward in rewards)
    return first


def _batches(items: list[tuple[int, Example]], size: int) -> Iterator[list[tuple[int, Example]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rejection_sample(
    engine: Engine,
    examples: Sequence[Example],
    out_path: str | Path,
    *,
    k: int = DEFAULT_K,
    params: SamplingParams | None = None,
    seed: int = 0,
    problems_per_batch: int = DEFAULT_PROBLEMS_PER_BATCH,
    check: AnswerCheck | None = None,
    prompt_style: PromptStyle = "full",
    progress: bool = False,
) -> RejectionStats:
    """Sample every problem of `examples` K times, write the accepted ones to `out_path`; resumes.

    `params` sets temperature (paper: 1.0), top-p, budget and logits processors; its `n` and `seed` are
    replaced (K, and the per-problem seed). Prompts carry the format instruction in `prompt_style`. Re-running with the same arguments continues an interrupted
    run; a finished run does nothing. Returns the statistics, also in `stats_path_for(out_path)`.
    """
    if k < 1 or problems_per_batch < 1:
        raise ValueError(
            f"k and problems_per_batch must be >= 1, got k={k}, problems_per_batch={problems_per_batch}"
        )
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"problem ids must be unique to resume by id; {duplicate!r} occurs twice or more")
    params = params or SamplingParams(temperature=1.0)
    out, stats_path = Path(out_path), stats_path_for(out_path)
    settings = {
        "k": k,
        "seed": seed,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "prompt_style": prompt_style,
    }
    journal = _open_journal(out, stats_path, settings)
    done = set(journal.done)
    todo = [(i, e) for i, e in enumerate(examples) if e.id not in done]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), disable=not progress, unit="problem")
    for batch in _batches(todo, problems_per_batch):
        rollouts = _sample(engine, batch, params, k, seed, prompt_style)
        first = _first_accepted(rollouts, [e for _, e in batch], check, journal.stats)
        lines = []
        for (_, example), group, j in zip(batch, rollouts, first, strict=True):
            if j is None:
                continue
            record = {
                "id": example.id,
                "question": example.question,
                "answer": example.answer,
                "response": group[j].text,
                "tries": j + 1,
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            journal.stats.tries[j + 1] = journal.stats.tries.get(j + 1, 0) + 1
        journal.stats.problems += len(batch)
        journal.stats.accepted += len(lines)
        journal.output_bytes = _append(out, lines)
        journal.done += [e.id for _, e in batch]
        journal.write(stats_path)  # the commit: only now does this batch count as done
        bar.update(len(batch))
    bar.close()
    return journal.stats


def load_stats(out_path: str | Path) -> RejectionStats:
    """The statistics of the rejection-sampling output at `out_path`."""
    data = json.loads(stats_path_for(out_path).read_text(encoding="utf-8"))
    return RejectionStats.from_dict(data["stats"])
