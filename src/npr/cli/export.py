"""`npr export gguf MODEL OUT.gguf`: a checkpoint, with its tag tokens, as a GGUF file llama.cpp loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app

export_app = typer.Typer(no_args_is_help=True, help="Export a model to another format.")
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def gguf(
    model: Annotated[str, typer.Argument(help="HF folder, run directory, named model, or 'tiny'.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write (atomically).")],
    dtype: Annotated[str, typer.Option(help="f32 (exact), f16, bf16 or q8_0.")] = "f32",
) -> None:
    """Convert with llama.cpp's own converter; a checkpoint without the tags gets them first."""
    from npr.engine.loader import tagged_model_folder
    from npr.export import DTYPES, export_gguf

    if dtype not in DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", param_hint="--dtype")
    try:
        folder = tagged_model_folder(model)
        written = export_gguf(folder, out, dtype)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="MODEL") from None
    typer.echo(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB, {dtype}) from {folder}")
