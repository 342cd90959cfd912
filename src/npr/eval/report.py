"""Result files of an evaluation (JSONL records, JSON + markdown summary, a plot) and side-by-side tables.

A result folder holds:

- ``records.jsonl``: one line per problem (question, gold, every sample's answer, verdict, tokens, latency);
- ``rollouts.jsonl``: every rollout (``npr.engine.load_rollouts`` reads it back);
- ``baseline_records.jsonl`` / ``baseline_rollouts.jsonl``: the same for the sequential baseline, if run;
- ``summary.json``: settings, metrics of the run (and baseline) and the speedups; ``summary.md``: as a table;
- ``plot.png``: accuracy, tokens per answer (total vs critical path) and latency per problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npr.engine import save_rollouts
from npr.eval.metrics import RunMetrics, Speedup, problem_latencies
from npr.files import atomic_write

if TYPE_CHECKING:
    from npr.eval.harness import EvalResult, RunResult

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PLOT = "plot.png"
RECORDS = "records.jsonl"
ROLLOUTS = "rollouts.jsonl"
BASELINE_PREFIX = "baseline_"

_COLUMNS = (
    "run", "mode", "k", "avg@k", "pass@k", "format-valid", "parallel", "tokens/answer", "critical path/answer",
    "TPS", "latency (s)", "speedup (TPS)", "speedup (latency)", "ideal speedup",
)  # fmt: skip


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _row(label: str, m: RunMetrics, s: Speedup | None) -> list[str]:
    """One table row; the speedup cells stay empty for a run without a baseline (or for the baseline)."""
    return [
        label,
        m.mode,
        str(m.k),
        _pct(m.avg_at_k),
        _pct(m.pass_at_k),
        _pct(m.format_valid_rate),
        _pct(m.parallel_rate),
        f"{m.total_tokens / m.samples:.1f}",
        f"{m.critical_path_tokens / m.samples:.1f}",
        f"{m.tps:.1f}",
        f"{m.latency_s:.2f}",
        f"{s.tps:.2f}×" if s else "–",
        f"{s.latency:.2f}×" if s else "–",
        f"{m.ideal_speedup:.2f}×",
    ]


def _table(rows: Sequence[list[str]]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_rows(label: str, summary: dict[str, Any]) -> list[list[str]]:
    """The run's row, then its baseline's row if it has one."""
    speed = Speedup(**summary["speedup"]) if summary.get("speedup") else None
    rows = [_row(label, RunMetrics.from_dict(summary["metrics"]), speed)]
    if summary.get("baseline"):
        rows.append(_row(f"{label} (baseline)", RunMetrics.from_dict(summary["baseline"]), None))
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a short markdown page: settings, the table, pass@k per k, finish reasons."""
    st, p = summary["settings"], summary["settings"]["params"]
    info = ", ".join(f"{k} {v}" for k, v in st.get("info", {}).items() if v is not None)
    m = RunMetrics.from_dict(summary["metrics"])
    pass_at = ", ".join(f"pass@{k} {_pct(v)}" for k, v in m.pass_at.items())
    lines = [
        "# Evaluation",
        "",
        *([info, ""] if info else []),
        f"{st['problems']} problems × k={st['k']}, mode {st['mode']}, temperature {p['temperature']}, "
        f"top-p {p['top_p']}, max_new_tokens {p['max_new_tokens']}, seed {p['seed']}, "
        f"verifier {st['verifier']}, {st['date']}",
        "",
        _table(_summary_rows("this run", summary)),
        "",
        f"- {pass_at}; best@k {_pct(m.best_at_k)}",
        f"- branches per fork {m.branches_per_fork:.2f}; wall time {m.wall_time_s:.2f} s",
        "- finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(m.finish_reasons.items())),
    ]
    return "\n".join(lines) + "\n"


def write_summary(result: EvalResult, out_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    atomic_write(out_dir / SUMMARY_JSON, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out_dir / SUMMARY_MD, summary_markdown(summary))
    return summary


def write_plot(result: EvalResult, path: str | Path) -> None:
    """Accuracy and format rates, tokens per answer (total vs critical path), latency per problem; per mode."""
    from matplotlib.figure import Figure  # ~1 s to import: only runs that plot pay for it

    runs = [r for r in (result.run, result.baseline) if r is not None]
    fig = Figure(figsize=(13, 3.8), layout="constrained")  # no pyplot: no global backend state, no GUI
    acc, tokens, latency = fig.subplots(1, 3)
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        m = run.metrics
        rates = [m.avg_at_k, m.pass_at_k, m.format_valid_rate, m.parallel_rate]
        acc.bar([i + j * width for i in range(len(rates))], [100 * x for x in rates], width, label=m.mode)
        per_answer = [m.total_tokens / m.samples, m.critical_path_tokens / m.samples]
        tokens.bar([i + j * width for i in range(2)], per_answer, width, label=m.mode)
        lat = problem_latencies(run.rollouts)
        latency.plot(range(len(lat)), lat, marker="o", markersize=3, label=m.mode)
    k = result.run.metrics.k
    centre = width * (len(runs) - 1) / 2
    acc.set_xticks([i + centre for i in range(4)], [f"avg@{k}", f"pass@{k}", "format-valid", "parallel"])
    acc.set(ylabel="%", ylim=(0, 100), title="Accuracy and format")
    tokens.set_xticks([centre, 1 + centre], ["total", "critical path"])
    tokens.set(ylabel="tokens per answer", title="Tokens per answer")
    latency.set(xlabel="problem", ylabel="seconds", title="Latency per problem (mean over samples)")
    for ax in (acc, tokens, latency):
        ax.legend()
    fig.savefig(path, dpi=110)


def _write_run(run: RunResult, out_dir: Path, prefix: str) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run.records)
    atomic_write(out_dir / f"{prefix}{RECORDS}", lines)
    save_rollouts(run.rollouts, out_dir / f"{prefix}{ROLLOUTS}")


def write_outputs(result: EvalResult, out_dir: str | Path) -> None:
    """Every file of a result folder (see the module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_run(result.run, out_dir, "")
    if result.baseline is not None:
        _write_run(result.baseline, out_dir, BASELINE_PREFIX)
    write_summary(result, out_dir)
    write_plot(result, out_dir / PLOT)


def load_summary(result_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a result folder; the error names the folder when it is not one."""
    path = Path(result_dir) / SUMMARY_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{result_dir}: no {SUMMARY_JSON} (not an `npr eval` result folder)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        runs = summary["benches"].values() if summary.get("kind") == "suite" else [summary]
        for run in runs:
            RunMetrics.from_dict(run["metrics"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not an evaluation summary ({e!r})") from e
    return summary


def compare(result_dirs: Sequence[str | Path]) -> str:
    """Runs side by side, named by folder: one table row per run (and one per baseline); benchmark suites
    (`npr eval --bench`) as the paper's accuracy, parallel-rate and efficiency tables."""
    from npr.eval.tables import is_suite, tables_markdown

    if not result_dirs:
        raise ValueError("compare needs at least one result folder")
    runs = [(Path(d).name or str(d), load_summary(d)) for d in result_dirs]
    suites = [is_suite(s) for _, s in runs]
    if all(suites):
        return tables_markdown(runs)
    if any(suites):
        mixed = [label for (label, _), suite in zip(runs, suites, strict=True) if suite]
        raise ValueError(f"cannot compare benchmark suites {mixed} with single runs: compare like with like")
    return _table([row for label, s in runs for row in _summary_rows(label, s)])
