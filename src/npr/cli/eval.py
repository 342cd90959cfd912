"""`npr eval`: evaluate a model on a dataset and write a result folder, or compare result folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app
from npr.eval.harness import DEFAULT_MAX_NEW_TOKENS, PAPER_K, PAPER_TEMPERATURE, PAPER_TOP_P, check_run


def _compare(dirs: list[Path]) -> None:
    from npr.eval import compare

    if not dirs:
        raise typer.BadParameter("give the result folders to compare: npr eval --compare DIR1 DIR2 …")
    try:
        typer.echo(compare(dirs))
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None


@app.command("eval")
def eval_command(
    dirs: Annotated[list[Path] | None, typer.Argument(help="Result folders, with --compare.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Print the result folders side by side.")
    ] = False,
    model: Annotated[str | None, typer.Option(help="HF folder, named model, or 'tiny'.")] = None,
    data: Annotated[str | None, typer.Option(help="JSONL file or task:NAME?n=…&seed=….")] = None,
    k: Annotated[int, typer.Option("-k", help="Samples per problem (paper: 8 on small sets).")] = PAPER_K,
    out: Annotated[Path | None, typer.Option(help="Result folder to write.")] = None,
    mode: Annotated[str, typer.Option(help="parallel or sequential.")] = "parallel",
    baseline: Annotated[
        str | None, typer.Option(help="'sequential': also run sequentially and report the speedups.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Budget over all branches of one answer.")
    ] = DEFAULT_MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(help="Paper: 1.0.")] = PAPER_TEMPERATURE,
    top_p: Annotated[float, typer.Option(help="Paper: 0.7.")] = PAPER_TOP_P,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N problems.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sample j of every problem uses seed + j.")] = 0,
    max_batch_requests: Annotated[int, typer.Option(help="Requests decoded together.")] = 64,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Evaluate a model (avg@k, pass@k, format, parallel rate, TPS, latency, speedup) into a result folder."""
    if compare:
        return _compare(dirs or [])
    if dirs:
        raise typer.BadParameter(f"folders {[str(d) for d in dirs]} are only read with --compare")
    if model is None or data is None or out is None:
        missing = [name for name, v in (("--model", model), ("--data", data), ("--out", out)) if v is None]
        raise typer.BadParameter(f"missing {', '.join(missing)} (or use --compare DIR …)")
    if limit is not None and limit < 1:
        raise typer.BadParameter(f"--limit must be >= 1, got {limit}")

    from npr.data import load_dataset
    from npr.engine import ParallelEngine
    from npr.eval import evaluate, paper_params
    from npr.eval.report import summary_markdown
    from npr.model import load_any

    try:  # every user error surfaces here, before the model loads
        check_run(mode, baseline, k)
        params = paper_params(
            k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
        )
        dataset = load_dataset(data)[:limit]
    except (ValueError, OSError) as e:  # DataError and ParamError are ValueErrors
        raise typer.BadParameter(str(e)) from None
    if not dataset:
        raise typer.BadParameter(f"--data {data}: no problems")
    net, tok = load_any(model)
    result = evaluate(
        ParallelEngine(net, tok, max_batch_requests=max_batch_requests),
        dataset,
        k=k,
        params=params,
        mode=mode,  # type: ignore[arg-type]  # checked by check_run
        baseline=baseline,  # type: ignore[arg-type]
        progress=progress,
        out_dir=out,
        info={"model": model, "data": data, "limit": limit},
    )
    typer.echo(summary_markdown(result.summary()))
    typer.echo(f"wrote {result.out_dir}")
