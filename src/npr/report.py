"""The pipeline's report: one table like the paper's, training curves and a page of sample trajectories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npr.files import atomic_write

if TYPE_CHECKING:
    from npr.pipeline import Pipeline

LABELS = {
    "seed": "Seed",
    "npr_zero": "NPR-Zero",
    "npr_beta": "NPR-Beta",
    "sr_beta": "SR-Beta",
    "sr": "SR",
    "npr": "NPR",
}
_SFT_CURVES, _RL_CURVES = ("train/loss",), ("reward/mean", "reward/accuracy")
CURVES = {"seed": _SFT_CURVES, "npr_zero": _RL_CURVES, "npr_beta": _SFT_CURVES, "sr_beta": _SFT_CURVES}
CURVES |= {"npr": _RL_CURVES, "sr": _RL_CURVES}
"""What each trained stage's panel shows: SFT its loss, RL its mean reward and accuracy per step."""


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model: accuracy, intermediates, rates, TPS, and speedups against the seed decoding sequentially.

    `speedup_path` is the seed's tokens per answer over the model's critical-path tokens per answer: the
    latency speedup if a step over several branches cost what a one-branch step costs. Measured latency
    falls short of it by the engine's cost per extra branch.
    """
    base = results["seed"]["summary"]["metrics"]
    base_latency = results["seed"]["latency_solo_s"]
    table = {}
    for name, r in results.items():
        m = r["summary"]["metrics"]
        answers = m["problems"] * m["k"]
        table[name] = {
            "accuracy": m["avg_at_k"],
            "intermediates_correct": r["intermediates"],
            "format_valid": m["format_valid_rate"],
            "parallel_rate": m["parallel_rate"],
            "branches_per_fork": m["branches_per_fork"],
            "tps": m["tps"],
            "latency_s": r["latency_solo_s"],
            "latency_batched_s": m["latency_s"],
            "speedup_tps": m["tps"] / base["tps"] if base["tps"] else 0.0,
            "speedup_latency": base_latency / r["latency_solo_s"] if r["latency_solo_s"] else 0.0,
            "speedup_path": base["total_tokens"] / m["critical_path_tokens"]
            if m["critical_path_tokens"]
            else 0.0,
            "ideal_speedup": m["ideal_speedup"],
            "tokens_per_answer": m["total_tokens"] / answers,
        }
    return table


def markdown(table: dict[str, dict[str, float]], k: int, problems: int, latency_problems: int) -> str:
    head = (
        f"| model | avg@{k} | all steps right | format-valid | parallel rate | branches/fork | TPS | "
        "speedup (TPS) | speedup (latency) | speedup (path) | ideal speedup |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = "".join(
        f"| {LABELS[n]} | {r['accuracy']:.3f} | {r['intermediates_correct']:.3f} | {r['format_valid']:.2f} | "
        f"{r['parallel_rate']:.2f} | {r['branches_per_fork']:.2f} | {r['tps']:.0f} | {r['speedup_tps']:.2f}× | "
        f"{r['speedup_latency']:.2f}× | {r['speedup_path']:.2f}× | {r['ideal_speedup']:.2f}× |\n"
        for n, r in table.items()
    )
    note = (
        f"\n{problems} held-out problems, {k} samples each, decoded together (TPS); latency: the first "
        f"{latency_problems} problems decoded one request at a time. Speedups against the seed decoding "
        "sequentially; path: the seed's tokens per answer ÷ the model's critical-path tokens per answer "
        "(the latency speedup if a step over n branches cost what a one-branch step costs); ideal: the "
        "model's own total ÷ critical-path tokens.\n"
    )
    return head + rows + note


def curve_series(run_dir: Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per trained stage and metric of `CURVES`: (steps, values) read from the stage's metrics.jsonl."""
    from npr.train.loop import read_metrics

    series = {}
    for stage, names in CURVES.items():
        if (run_dir / stage / "train" / "metrics.jsonl").exists():
            rows = read_metrics(run_dir / stage / "train")
            series[stage] = {
                n: ([r["step"] for r in rows if n in r], [r[n] for r in rows if n in r]) for n in names
            }
    return series


def plot_curves(run_dir: Path, out: Path) -> None:
    """One panel per trained stage: its loss (SFT) or mean reward and accuracy (RL) per step."""
    from matplotlib.figure import Figure

    series = curve_series(run_dir)
    if not series:
        return
    fig = Figure(figsize=(4 * len(series), 3), layout="constrained")
    for ax, (stage, curves) in zip(
        fig.subplots(1, len(series), squeeze=False)[0], series.items(), strict=True
    ):
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, label=name)
        ax.set_title(LABELS[stage])
        ax.set_xlabel("step")
        if len(curves) > 1:
            ax.legend(fontsize="small")
        else:
            ax.set_ylabel(next(iter(curves)))
    fig.savefig(out, dpi=100)


def write_report(pipeline: Pipeline, models: dict[str, str], results: dict[str, dict[str, Any]]) -> dict:
    from npr.engine import load_rollouts
    from npr.viz import render_page

    out = pipeline.out_dir
    table = summarize(results)
    spec = pipeline.config.eval
    atomic_write(out / "report.json", json.dumps(table, indent=2))
    checkpoints = "".join(f"- {LABELS[n]}: `{path}`\n" for n, path in models.items())
    atomic_write(
        out / "report.md",
        markdown(table, spec.k, spec.problems, spec.latency_problems) + "\nCheckpoints:\n" + checkpoints,
    )
    plot_curves(pipeline.run_dir, out / "curves.png")
    samples = [r for name in ("npr", "npr_beta") for r in load_rollouts(out / name / "rollouts.jsonl")[:4]]
    atomic_write(out / "samples.html", render_page(samples, title="npr demo: sample trajectories"))
    return table
