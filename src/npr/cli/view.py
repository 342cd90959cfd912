"""`npr view`: draw saved rollouts as reasoning graphs in one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app
from npr.model import load_any


@app.command()
def view(
    rollouts: Annotated[Path, typer.Argument(help="JSONL of rollouts (npr generate --json, save_rollouts).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write.")],
    model: Annotated[
        str | None, typer.Option(help="Tokenizer of the model that wrote them (folder or 'tiny'): adds text.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Draw only the first N rollouts.")] = None,
    title: Annotated[str | None, typer.Option(help="Page title (default: the file name).")] = None,
) -> None:
    """Write a page that draws each rollout's blocks, branches, positions and critical path."""
    from npr.engine import load_rollouts
    from npr.viz import render_page

    records = load_rollouts(rollouts)[:limit]
    tokenizer = load_any(model)[1] if model else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(records, tokenizer, title=title or rollouts.name), encoding="utf-8")
    typer.echo(f"{out}: {len(records)} rollouts, {sum(r.stats.branches for r in records)} branches")
