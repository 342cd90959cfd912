"""`npr generate`: decode prompts with the engine and show the answer and its branch structure."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from npr.cli import app
from npr.cli.options import BackendOption, open_engine


def describe(rollout) -> str:
    """One line per block: its fork width, branch lengths and the takeaway position."""
    lines = []
    for i, block in enumerate(rollout.blocks):
        lens = ", ".join(f"{b.plan_id}:{b.length}" for b in block.branches)
        lines.append(f"  block {i}: {len(block.branches)} branches [{lens}] g={block.guideline_position}")
    s = rollout.stats
    lines.append(
        f"  finish={rollout.finish_reason.value} tokens={s.total_tokens} critical_path={s.critical_path_tokens}"
        f" forks={s.forks} wall={s.wall_time:.2f}s"
    )
    return "\n".join(lines)


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A question; repeat for several.")],
    model: Annotated[str, typer.Option(help="HF folder, named model, or 'tiny'.")] = "tiny",
    mode: Annotated[str, typer.Option(help="parallel or sequential.")] = "parallel",
    n: Annotated[int, typer.Option(help="Samples per prompt.")] = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    max_new_tokens: Annotated[int, typer.Option(help="Budget over all branches.")] = 512,
    raw: Annotated[
        bool, typer.Option(help="Send the prompt as is, without the chat template/instruction.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print rollouts as JSON lines.")] = False,
    backend: BackendOption = "hf",
) -> None:
    """Generate answers; print each answer and its branch structure."""
    from npr.data import build_prompt
    from npr.engine import SamplingParams

    engine = open_engine(model, backend)
    tok = engine.tokenizer
    params = SamplingParams(
        n=n, temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
    )
    prompts = [p if raw else build_prompt(tok, p, parallel=mode == "parallel") for p in prompt]
    try:
        rollouts = engine.generate(prompts, params, mode=mode)
    except ValueError as exc:  # a mode the backend lacks, a prompt longer than the context, …
        raise typer.BadParameter(str(exc)) from None
    for r in rollouts:
        if as_json:
            typer.echo(json.dumps(r.to_dict()))
            continue
        typer.echo(f"[{r.index}.{r.sample}] answer={r.answer!r}")
        typer.echo(r.text)
        typer.echo(describe(r))
