"""`npr pipeline CONFIG` and `npr demo`: every stage of the method, then the comparison report."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app

DEMO_CONFIG = files("npr").joinpath("assets", "demo.yaml")


EvalBackend = Annotated[
    str | None,
    typer.Option(
        help="Engine of evaluation and latency: hf or llamacpp (default: the config's eval.backend)."
    ),
]


def _run(
    config: Path,
    from_scratch: bool,
    overrides: dict,
    until: str | None = None,
    eval_backend: str | None = None,
) -> None:
    from npr.data import DataError
    from npr.pipeline import STAGES, Pipeline, StaleStageError, load_pipeline_config
    from npr.pipeline.report import markdown
    from npr.train.config import ConfigError

    try:
        cfg = load_pipeline_config(config, **overrides)
        if eval_backend is not None:
            cfg = cfg.model_validate(
                {**cfg.model_dump(), "eval": {**cfg.eval.model_dump(), "backend": eval_backend}}
            )
    except (ConfigError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if until is not None and until not in STAGES:
        typer.echo(f"error: --until {until!r} is not a stage; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    try:
        pipe = Pipeline(cfg, from_scratch=from_scratch, log=typer.echo)
        if until is not None:
            for name, path in pipe.train_all(until).items():
                typer.echo(f"{name}: {path}")
            return
        report = pipe.run()
    except (StaleStageError, DataError) as e:
        typer.echo(f"error: {config}: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(markdown(report, cfg.eval.k, cfg.eval.problems))
    if warning := report["latency"]["warning"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"report: {cfg.out_dir}/report.md, report.json, curves.png, samples.html")


@app.command()
def pipeline(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML (see configs/demo.yaml).")],
    from_scratch: Annotated[bool, typer.Option(help="Train the seed even if the config names one.")] = False,
    until: Annotated[
        str | None,
        typer.Option(help="Stop after this stage (no evaluation), e.g. 'seed' to train only the seed."),
    ] = None,
    eval_backend: EvalBackend = None,
) -> None:
    """Run every stage (seed, NPR-Zero, rejection, NPR-Beta, SR-Beta, NPR, SR), evaluate, report."""
    _run(config, from_scratch, {}, until, eval_backend)


@app.command()
def demo(
    from_scratch: Annotated[
        bool, typer.Option(help="Retrain the seed first (~8 min on one H100; hours on 2 CPU cores).")
    ] = False,
    out: Annotated[str, typer.Option(help="Report folder.")] = "results/demo",
    runs: Annotated[str, typer.Option(help="Checkpoints folder (stages cached here).")] = "runs/demo",
    eval_backend: EvalBackend = None,
) -> None:
    """The main job: a tiny model learns native parallel reasoning on CPU, end to end."""
    _run(Path(str(DEMO_CONFIG)), from_scratch, {"out_dir": out, "run_dir": runs}, eval_backend=eval_backend)
