"""The `npr` command: one sub-command per job, each in its own module under `npr.cli`."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Native Parallel Reasoner.")


@app.callback()
def _root() -> None:
    """Train, evaluate and serve models that reason in parallel branches."""


# Each module registers its command on `app` when imported.
from npr.cli import eval, export, generate, pipeline, plan, sample, serve, train, train_rl, view  # noqa: E402,F401


def main() -> None:
    app()
