"""Benchmark-suite results in the shape of the paper's Tables 2–4, as markdown, JSON and a plot.

- accuracy: one row per run, one column per benchmark (avg@k), then the average over benchmarks (Table 2);
- parallel rate: the share of answers with at least one real fork, per benchmark (Table 3);
- efficiency: per benchmark, tokens per second, tokens and critical-path tokens per answer, and the speedup
  over a sequential run of the same model and settings (Table 4).

A suite folder holds one `npr eval` result folder per benchmark plus the suite's ``summary.json``,
``summary.md`` and ``plot.png``; `tables_markdown` lays several suites side by side (`npr eval --compare`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npr.eval.metrics import RunMetrics
from npr.eval.report import PLOT, SUMMARY_JSON, SUMMARY_MD
from npr.files import atomic_write

SUITE = "suite"
"""The ``kind`` of a suite summary (a single run's summary has none)."""

Labelled = Sequence[tuple[str, dict[str, Any]]]
"""(row label, suite summary) pairs, in row order."""


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _metrics(summary: dict[str, Any], bench: str, key: str = "metrics") -> RunMetrics | None:
    run = summary["benches"].get(bench)
    return RunMetrics.from_dict(run[key]) if run and run.get(key) else None


def _titles(runs: Labelled) -> dict[str, str]:
    """Benchmark name → column title, over every run, in first-seen order."""
    titles: dict[str, str] = {}
    for _, s in runs:
        for name, run in s["benches"].items():
            titles.setdefault(name, run["settings"]["info"].get("title", name))
    return titles


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def _wide(runs: Labelled, value: str, with_baseline: bool) -> str:
    """Runs × benchmarks of one metric (`avg_at_k` or `parallel_rate`), with the mean over benchmarks."""
    titles = _titles(runs)
    rows = []
    keys = [("metrics", "")] + ([("baseline", " (sequential)")] if with_baseline else [])
    for label, s in runs:
        for key, suffix in keys:
            cells = [_metrics(s, b, key) for b in titles]
            if key == "baseline" and not any(cells):
                continue
            values = [getattr(m, value) if m else None for m in cells]
            present = [v for v in values if v is not None]
            mean = statistics.fmean(present) if present else None
            rows.append([label + suffix, *map(_pct, values), _pct(mean)])
    return _table(["run", *titles.values(), "Avg."], rows)


def accuracy_table(runs: Labelled) -> str:
    """Table 2's shape: avg@k (%) per benchmark and the average."""
    return _wide(runs, "avg_at_k", with_baseline=True)


def parallel_table(runs: Labelled) -> str:
    """Table 3's shape: parallel rate (%) per benchmark and the average."""
    return _wide(runs, "parallel_rate", with_baseline=False)


def efficiency_table(runs: Labelled) -> str:
    """Table 4's shape: throughput, critical path and speedup over the sequential run, per benchmark."""
    titles = _titles(runs)
    rows = []
    for label, s in runs:
        for bench, title in titles.items():
            m, base = _metrics(s, bench), _metrics(s, bench, "baseline")
            if m is None:
                continue
            speed = s["benches"][bench].get("speedup") or {}
            rows.append([
                label, title, f"{m.tps:.1f}", f"{base.tps:.1f}" if base else "–", _times(speed.get("tps")),
                _times(speed.get("latency")), f"{m.total_tokens / m.samples:.1f}",
                f"{m.critical_path_tokens / m.samples:.1f}", _times(m.ideal_speedup),
            ])  # fmt: skip
    header = [
        "run", "benchmark", "TPS", "sequential TPS", "speedup (TPS)", "speedup (latency)", "tokens/answer",
        "critical path/answer", "ideal speedup",
    ]  # fmt: skip
    return _table(header, rows)


def suite_average(summary: dict[str, Any]) -> dict[str, float | None]:
    """Means over benchmarks: accuracy, parallel rate, TPS speedup (None where no benchmark has it)."""
    runs = list(summary["benches"].values())
    speedups = [r["speedup"]["tps"] for r in runs if r.get("speedup")]
    return {
        "avg_at_k": statistics.fmean(r["metrics"]["avg_at_k"] for r in runs),
        "parallel_rate": statistics.fmean(r["metrics"]["parallel_rate"] for r in runs),
        "format_valid_rate": statistics.fmean(r["metrics"]["format_valid_rate"] for r in runs),
        "speedup_tps": statistics.fmean(speedups) if speedups else None,
    }


def tables_markdown(runs: Labelled) -> str:
    """The three tables, titled."""
    return "\n\n".join([
        "## Accuracy (avg@k, %)", accuracy_table(runs),
        "## Parallel rate (%)", parallel_table(runs),
        "## Efficiency", efficiency_table(runs),
    ])  # fmt: skip


def suite_markdown(summary: dict[str, Any]) -> str:
    """A suite's summary page: protocol and settings, then the three tables."""
    p = summary["protocol"]
    info = ", ".join(f"{k} {v}" for k, v in summary.get("info", {}).items() if v is not None)
    ks = ", ".join(f"{n} {r['settings']['k']}" for n, r in summary["benches"].items())
    lines = [
        "# Benchmark evaluation",
        "",
        *([info, ""] if info else []),
        f"protocol {p['name']}: mode {p['mode']}, temperature {p['temperature']}, top-p {p['top_p']}, "
        f"max_new_tokens {p['max_new_tokens']}; samples per problem: {ks}",
        "",
        tables_markdown([("this run", summary)]),
    ]
    return "\n".join(lines) + "\n"


def write_suite(summary: dict[str, Any], out_dir: str | Path) -> None:
    """``summary.json``, ``summary.md`` and ``plot.png`` of a suite folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SUMMARY_JSON, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out / SUMMARY_MD, suite_markdown(summary))
    write_suite_plot(summary, out / PLOT)


def write_suite_plot(summary: dict[str, Any], path: str | Path) -> None:
    """Per benchmark: accuracy (run vs sequential), parallel rate, and the TPS speedup."""
    from matplotlib.figure import Figure  # only runs that plot pay for the import

    names = list(summary["benches"])
    titles = [summary["benches"][n]["settings"]["info"].get("title", n) for n in names]
    runs = {key: [_metrics(summary, n, key) for n in names] for key in ("metrics", "baseline")}
    fig = Figure(figsize=(14, 3.8), layout="constrained")
    acc, par, speed = fig.subplots(1, 3)
    x = range(len(names))
    for shift, key, label in ((-0.2, "metrics", "this run"), (0.2, "baseline", "sequential")):
        if any(runs[key]):
            values = [100 * m.avg_at_k if m else 0.0 for m in runs[key]]
            acc.bar([i + shift for i in x], values, 0.4, label=label)
    par.bar(x, [100 * m.parallel_rate if m else 0.0 for m in runs["metrics"]], 0.6)
    speedups = [(summary["benches"][n].get("speedup") or {}).get("tps") or 0.0 for n in names]
    speed.bar(x, speedups, 0.6)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    for ax, title, ylabel in (
        (acc, "Accuracy (avg@k)", "%"),
        (par, "Parallel rate", "%"),
        (speed, "Speedup over sequential (TPS)", "×"),
    ):
        ax.set_xticks(list(x), titles, rotation=30, ha="right")
        ax.set(title=title, ylabel=ylabel)
    acc.set_ylim(0, 100)
    par.set_ylim(0, 100)
    acc.legend()
    fig.savefig(path, dpi=110)


def is_suite(summary: dict[str, Any]) -> bool:
    return summary.get("kind") == SUITE
