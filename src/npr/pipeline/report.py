"""The pipeline's report: per split a table like the paper's with 95% bootstrap intervals, the differences
between models that are significant, the latency's spread and load, curves and sample trajectories.

`report.json`: `splits[split][model]` holds `accuracy`, `intermediates_correct` and `speedup_latency`, each with
`<name>_ci: [low, high]`, and the other metrics; `comparisons` lists paired differences with their intervals;
`latency` the timing's repeats, spread and load (and a warning when the machine was busy).
"""

from __future__ import annotations

import json
import statistics
from typing import TYPE_CHECKING, Any

from npr.files import atomic_write
from npr.pipeline.figures import LABELS, plot_curves, samples_page
from npr.pipeline.stats import diff_ci, mean_ci, ratio_ci

if TYPE_CHECKING:
    from npr.pipeline.latency import Latency
    from npr.pipeline.stages import Pipeline

BASE = "seed"
"""Speedups are against the seed decoding sequentially, on the same problems with the same engine."""
PAIRS = (("npr", "npr_beta"), ("npr", "sr"), ("npr_beta", "sr_beta"), ("npr", "seed"), ("sr", "seed"))
"""Model pairs whose differences the report tests (the paper's comparisons)."""
METRICS = ("accuracy", "intermediates_correct")


def _row(result: dict[str, Any], base: dict[str, Any], times: list[float], base_times: list[float]) -> dict:
    """One model's columns on one split.

    `speedup_path` is the seed's tokens per answer over the model's critical-path tokens per answer: the
    latency speedup if a step over several branches cost what a one-branch step costs.
    """
    m, b = result["summary"]["metrics"], base["summary"]["metrics"]
    return {
        "accuracy": statistics.fmean(result["accuracy"]),
        "accuracy_ci": mean_ci(result["accuracy"]),
        "intermediates_correct": statistics.fmean(result["intermediates_correct"]),
        "intermediates_correct_ci": mean_ci(result["intermediates_correct"]),
        "format_valid": m["format_valid_rate"],
        "parallel_rate": m["parallel_rate"],
        "branches_per_fork": m["branches_per_fork"],
        "tps": m["tps"],
        "speedup_tps": m["tps"] / b["tps"] if b["tps"] else 0.0,
        "latency_s": statistics.fmean(times),
        "speedup_latency": sum(base_times) / sum(times),
        "speedup_latency_ci": ratio_ci(base_times, times),
        "latency_batched_s": m["latency_s"],
        "speedup_path": b["total_tokens"] / m["critical_path_tokens"] if m["critical_path_tokens"] else 0.0,
        "ideal_speedup": m["ideal_speedup"],
        "tokens_per_answer": m["total_tokens"] / (m["problems"] * m["k"]),
    }


def comparisons(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Paired bootstrap of each PAIRS difference per split and metric; significant: the interval excludes 0."""
    out = []
    for split, models in results.items():
        for a, b in PAIRS:
            for metric in METRICS:
                low, high = diff_ci(models[a][metric], models[b][metric])
                diff = statistics.fmean(models[a][metric]) - statistics.fmean(models[b][metric])
                out.append(
                    {
                        "split": split,
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "difference": diff,
                        "difference_ci": (low, high),
                        "significant": low > 0 or high < 0,
                    }
                )
    return out


def summarize(results: dict[str, dict[str, dict[str, Any]]], latency: Latency, repeats: int) -> dict:
    """report.json's content from the per-split evaluations and the latency timings."""
    splits = {
        split: {
            name: _row(r, models[BASE], latency.median(split, name), latency.median(split, BASE))
            | {"latency_spread": latency.spread(split, name)}
            for name, r in models.items()
        }
        for split, models in results.items()
    }
    return {
        "splits": splits,
        "comparisons": comparisons(results),
        "latency": {
            "repeats": repeats,
            "problems": {s: len(next(iter(t.values()))) for s, t in latency.tries.items()},
            "load_average_max": max(latency.load, default=0.0),
            "warning": latency.warning(),
        },
    }


def _ci(row: dict[str, Any], name: str, fmt: str = ".3f") -> str:
    low, high = row[f"{name}_ci"]
    return f"{row[name]:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _table(rows: dict[str, dict[str, Any]], k: int) -> str:
    head = (
        f"| model | avg@{k} [95% CI] | all steps right [95% CI] | format-valid | parallel rate | "
        "branches/fork | TPS | speedup (TPS) | latency s (spread) | speedup (latency) [95% CI] | "
        "speedup (path) | ideal speedup |\n" + "|---" * 12 + "|\n"
    )
    return head + "".join(
        f"| {LABELS[n]} | {_ci(r, 'accuracy')} | {_ci(r, 'intermediates_correct')} | {r['format_valid']:.2f} | "
        f"{r['parallel_rate']:.2f} | {r['branches_per_fork']:.2f} | {r['tps']:.0f} | {r['speedup_tps']:.2f}× | "
        f"{r['latency_s']:.2f} (±{r['latency_spread']:.0%}) | {_ci(r, 'speedup_latency', '.2f')}× | "
        f"{r['speedup_path']:.2f}× | {r['ideal_speedup']:.2f}× |\n"
        for n, r in rows.items()
    )


def _significance(report: dict[str, Any]) -> str:
    lines = []
    for c in report["comparisons"]:
        low, high = c["difference_ci"]
        verdict = "significant" if c["significant"] else "not significant"
        name = "avg@k" if c["metric"] == "accuracy" else "all steps right"
        lines.append(
            f"- {c['split']}, {name}: {LABELS[c['a']]} − {LABELS[c['b']]} = {c['difference']:+.3f} "
            f"[{low:+.3f}, {high:+.3f}]: {verdict}\n"
        )
    return "".join(lines)


def markdown(report: dict[str, Any], k: int, problems: int) -> str:
    """The readable report: one table per split, then the tested differences and the latency's caveats."""
    latency = report["latency"]
    parts = [f"### {split}\n\n{_table(rows, k)}" for split, rows in report["splits"].items()]
    note = (
        f"\n{problems} held-out problems per split, {k} samples each, decoded together (TPS). Latency: the "
        f"first {', '.join(map(str, latency['problems'].values()))} problems of each split decoded one request "
        f"at a time, {latency['repeats']} times per model with the models taking turns; the median per "
        "problem is kept; spread: median (max − min) / median of a problem's tries. Speedups against the seed "
        "decoding sequentially; path: the seed's tokens per answer ÷ the model's critical-path tokens per "
        "answer; ideal: the model's own total ÷ critical-path tokens. Intervals: 95% bootstrap over "
        f"problems. Highest 1-minute load average while timing: {latency['load_average_max']:.1f}.\n"
    )
    if latency["warning"]:
        note += f"\n**Warning:** {latency['warning']}.\n"
    tests = "\nDifferences (paired bootstrap over problems, 95%):\n\n" + _significance(report)
    return "\n".join(parts) + note + tests


def write_report(
    pipeline: Pipeline,
    models: dict[str, str],
    results: dict[str, dict[str, dict[str, Any]]],
    latency: Latency,
) -> dict[str, Any]:
    """report.json, report.md, curves.png and samples.html in OUT_DIR; returns report.json's content."""
    out, spec = pipeline.out_dir, pipeline.config.eval
    report = json.loads(json.dumps(summarize(results, latency, spec.latency_repeats)))
    atomic_write(out / "report.json", json.dumps(report, indent=2))
    checkpoints = "".join(f"- {LABELS[n]}: `{path}`\n" for n, path in models.items())
    text = markdown(report, spec.k, spec.problems) + "\nCheckpoints:\n" + checkpoints
    atomic_write(out / "report.md", text)
    plot_curves(pipeline.run_dir, out / "curves.png")
    first = next(iter(spec.splits))
    samples_page(
        [out / first / name / "rollouts.jsonl" for name in ("npr", "npr_beta")], out / "samples.html"
    )
    return report
