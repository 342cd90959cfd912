"""`npr plan CONFIG --gpus N --gpu-mem GB`: memory per GPU of a training config, ddp vs fsdp, dense vs flex."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app

_PARTS = ("params", "grads", "optimizer", "gathered", "activations", "logits", "mask", "total")


@app.command()
def plan(
    config: Annotated[
        Path, typer.Argument(help="SFT or RL config YAML (e.g. configs/paper/npr_beta_sft.yaml).")
    ],
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the run is spread over.")] = 8,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", min=0, help="Memory of one GPU, GiB.")] = 80.0,
    model_config: Annotated[
        Path | None,
        typer.Option(help="Folder with the model's config.json (default: the config's model_path)."),
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option(min=0, help="RL: prompt length added to max_new_tokens.")
    ] = 1024,
) -> None:
    """Print the estimate (GiB per GPU) built from the model on the meta device; no weights are read."""
    from npr.plan import load_model_config, model_shape, plan_table, workload
    from npr.train.config import ConfigError, load_train_config

    try:
        cfg = load_train_config(config)
        shape = model_shape(load_model_config(cfg, model_config))
    except (ConfigError, FileNotFoundError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="CONFIG") from None
    work = workload(cfg, prompt_tokens)
    typer.echo(
        f"{config}: {shape.params / 1e9:.2f} B parameters, {work.rows} row(s) × {work.row_tokens} tokens per "
        f"micro-batch, dtype {work.dtype}, precision {work.precision}, activation checkpointing "
        f"{work.activation_checkpointing}, {gpus} GPUs of {gpu_mem:g} GiB"
    )
    typer.echo(f"{'distributed':<12}{'attention':<10}" + "".join(f"{p:>12}" for p in _PARTS) + "  fits")
    for row in plan_table(cfg, shape, gpus, gpu_mem, prompt_tokens):
        cells = "".join(f"{row[p]:>12.2f}" for p in _PARTS)
        typer.echo(f"{row['distributed']:<12}{row['attention']:<10}{cells}  {'yes' if row['fits'] else 'no'}")
