"""The report's pictures: training curves of every trained stage and a page of sample trajectories."""

from __future__ import annotations

from pathlib import Path

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


def samples_page(rollout_files: list[Path], out: Path, per_file: int = 4) -> None:
    """An HTML page (`npr view`'s renderer) with the first trajectories of each rollouts file."""
    from npr.engine import load_rollouts
    from npr.files import atomic_write
    from npr.viz import render_page

    samples = [r for path in rollout_files if path.exists() for r in load_rollouts(path)[:per_file]]
    atomic_write(out, render_page(samples, title="npr demo: sample trajectories"))
