"""`npr eval`: evaluate a model on a dataset or on the paper's benchmarks, or compare result folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app
from npr.cli.options import BackendOption, open_engine
from npr.eval.harness import DEFAULT_MAX_NEW_TOKENS, PAPER_K, PAPER_TEMPERATURE, PAPER_TOP_P, check_run

PROMPTS = ("full", "short", "official")


def _compare(dirs: list[Path]) -> None:
    from npr.eval import compare

    if not dirs:
        raise typer.BadParameter("give the result folders to compare: npr eval --compare DIR1 DIR2 …")
    try:
        typer.echo(compare(dirs))
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None


def _default_out(kind: str, model: str) -> Path:
    return Path("runs") / "eval" / f"{Path(kind).stem}-{Path(model).name or 'model'}"


@app.command("eval")
def eval_command(
    dirs: Annotated[list[Path] | None, typer.Argument(help="Result folders, with --compare.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Print the result folders side by side.")
    ] = False,
    model: Annotated[
        str | None, typer.Option(help="HF folder, hub id (e.g. bigai-NPR/NPR-4B), named model, or 'tiny'.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="JSONL file or task:NAME?n=…&seed=….")] = None,
    bench: Annotated[
        str | None, typer.Option(help="Benchmarks: 'paper' (all eight) or names, e.g. aime24,math500.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Read each benchmark from DIR/<name>.jsonl|.parquet, not the hub.")
    ] = None,
    protocol: Annotated[
        str | None, typer.Option(help="Preset of settings; 'paper' (the default with --bench).")
    ] = None,
    k: Annotated[
        int | None, typer.Option("-k", help="Samples per problem (default: the benchmark's; 8 with --data).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Result folder (default: runs/eval/<data>-<model>).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="parallel (default) or sequential.")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="'sequential': also run sequentially for the speedups (default with --bench); 'none'."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Budget over all branches of one answer (paper protocol: 40000).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Paper: 1.0.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Paper: 0.7.")] = None,
    prompt: Annotated[
        str, typer.Option(help="Instruction: full, short, or official (the paper's, for its checkpoints).")
    ] = "full",
    enable_thinking: Annotated[
        bool | None,
        typer.Option(
            "--enable-thinking/--no-enable-thinking",
            help="Chat-template switch of Qwen3 models (--no-enable-thinking for a non-thinking backbone).",
        ),
    ] = None,
    backend: BackendOption = "hf",
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N problems (of each).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sample j of every problem uses seed + j.")] = 0,
    max_batch_requests: Annotated[int, typer.Option(help="Requests decoded together.")] = 64,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Evaluate a model (avg@k, pass@k, format, parallel rate, TPS, latency, speedup) into a result folder.

    With --bench, the paper's benchmarks under a protocol (default: the paper's), written as one result
    folder per benchmark plus the paper-shaped tables (summary.md, summary.json, plot.png).
    """
    if compare:
        return _compare(dirs or [])
    if dirs:
        raise typer.BadParameter(f"folders {[str(d) for d in dirs]} are only read with --compare")
    if model is None or (data is None) == (bench is None):
        raise typer.BadParameter("give --model and one of --data or --bench (or use --compare DIR …)")
    if limit is not None and limit < 1:
        raise typer.BadParameter(f"--limit must be >= 1, got {limit}")
    if prompt not in PROMPTS:
        raise typer.BadParameter(f"--prompt must be one of {PROMPTS}, got {prompt!r}")
    if (data_dir is not None or protocol is not None) and bench is None:
        raise typer.BadParameter("--data-dir and --protocol go with --bench")

    from npr.data import load_dataset
    from npr.eval import evaluate, paper_params
    from npr.eval.bench import resolve_benches
    from npr.eval.checkpoint import missing_tags, require_tags, resolve_checkpoint
    from npr.eval.harness import PromptSpec
    from npr.eval.protocol import get_protocol
    from npr.eval.report import summary_markdown
    from npr.eval.suite import evaluate_suite, load_suite
    from npr.eval.tables import suite_markdown

    base = None if baseline == "none" else baseline or ("sequential" if bench else None)
    try:  # every user error surfaces here, before the model loads
        if bench is not None:
            preset = get_protocol(protocol or "paper").with_overrides(
                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, k=k, mode=mode
            )
            check_run(preset.mode, base, preset.k or 1)
            suite = load_suite(resolve_benches(bench), data_dir, limit)
            for b, _ in suite:  # bad sampling values are refused here too
                preset.params(b)
            run_mode: str = preset.mode
        else:
            run_mode = mode or "parallel"
            check_run(run_mode, base, k or PAPER_K)
            params = paper_params(
                k or PAPER_K,
                temperature=PAPER_TEMPERATURE if temperature is None else temperature,
                top_p=PAPER_TOP_P if top_p is None else top_p,
                max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                seed=seed,
            )
            dataset = load_dataset(str(data))[:limit]
            if not dataset:
                raise ValueError(f"--data {data}: no problems")
        source = resolve_checkpoint(model)
        if run_mode == "parallel":
            require_tags(source)
        tags_as_ids = prompt == "official" and not missing_tags(source)
    except (ValueError, OSError) as e:  # DataError, BenchError, ParamError, CheckpointError are ValueErrors
        raise typer.BadParameter(str(e)) from None
    template = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    spec = PromptSpec(style=prompt, template=template, tags_as_ids=tags_as_ids)  # type: ignore[arg-type]
    info = {"model": model, "backend": backend, "prompt": prompt}
    out_dir = out or _default_out(bench or str(data), model)
    # The official prompt carries tag ids: the engine must accept them (they are never parsed as structure).
    options = {"allow_prompt_tags": True} if tags_as_ids else {}
    engine = open_engine(source, backend, max_batch_requests=max_batch_requests, **options)
    if bench is not None:
        suite_result = evaluate_suite(
            engine, suite, preset, baseline=base, prompt=spec, out_dir=out_dir, seed=seed,  # type: ignore[arg-type]
            progress=progress, info={**info, "bench": bench},
        )  # fmt: skip
        typer.echo(suite_markdown(suite_result.summary()))
    else:
        result = evaluate(
            engine, dataset, k=params.n, params=params, mode=run_mode, baseline=base,  # type: ignore[arg-type]
            progress=progress, out_dir=out_dir, prompt=spec, info={**info, "data": data, "limit": limit},
        )  # fmt: skip
        typer.echo(summary_markdown(result.summary()))
    typer.echo(f"wrote {out_dir}")
    return None
