"""`npr sample`: rejection sampling (stage 2's data): K sequential samples per problem, keep the first good one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app
from npr.cli.options import BackendOption, open_engine
from npr.train.rejection import DEFAULT_K, DEFAULT_PROBLEMS_PER_BATCH


@app.command()
def sample(
    model: Annotated[
        str, typer.Option(help="HF folder (e.g. NPR-Zero's checkpoint), named model, or 'tiny'.")
    ],
    data: Annotated[str, typer.Option(help="JSONL file or task:NAME?n=…&seed=….")],
    out: Annotated[
        Path, typer.Option(help="JSONL of accepted samples; NAME.stats.json is written next to it.")
    ],
    k: Annotated[int, typer.Option("--k", "-k", help="Tries per problem (paper: 8).")] = DEFAULT_K,
    max_new_tokens: Annotated[int, typer.Option(help="Token budget per sample.")] = 4096,
    temperature: Annotated[float, typer.Option(help="Paper: 1.0.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling; 1.0 is off.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sample j of problem i uses seed + i·k + j.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    problems_per_batch: Annotated[
        int, typer.Option(help="Problems decoded together (k requests each).")
    ] = DEFAULT_PROBLEMS_PER_BATCH,
    prompt_style: Annotated[
        str, typer.Option(help="Instruction text: 'full' (pretrained models) or 'short' (the demo's).")
    ] = "full",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    backend: BackendOption = "hf",
) -> None:
    """Write the first correct, well-formed sample of each problem to --out; re-run to resume."""
    from npr.data import PROMPT_STYLES, load_dataset
    from npr.engine import SamplingParams
    from npr.train.rejection import rejection_sample

    if limit is not None and limit < 1:
        raise typer.BadParameter(f"--limit must be >= 1, got {limit}")
    if prompt_style not in PROMPT_STYLES:
        raise typer.BadParameter(f"--prompt-style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    try:  # user errors surface before the model loads
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        dataset = load_dataset(data)[:limit]
    except (ValueError, OSError) as exc:  # DataError and ParamError are ValueErrors
        raise typer.BadParameter(str(exc)) from None
    engine = open_engine(model, backend, max_batch_requests=max(64, k * problems_per_batch))
    try:
        stats = rejection_sample(
            engine,
            dataset,
            out,
            k=k,
            params=params,
            seed=seed,
            problems_per_batch=problems_per_batch,
            prompt_style=prompt_style,  # type: ignore[arg-type]  # checked above
            progress=progress,
        )
    except (ValueError, FileExistsError) as exc:  # bad k, settings changed on resume, foreign --out
        raise typer.BadParameter(str(exc)) from None
    summary = {key: value for key, value in stats.to_dict().items() if key != "finish_reasons"}
    typer.echo(json.dumps(summary))
    typer.echo(f"wrote {out}")
