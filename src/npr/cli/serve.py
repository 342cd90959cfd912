"""`npr serve`: an OpenAI-compatible HTTP server that decodes natively in parallel (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app
from npr.cli.options import BackendOption, open_engine
from npr.model import TINY

_DTYPES = {"float32", "bfloat16", "float16"}


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="HF folder, named model, or 'tiny' (random, for smoke tests).")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model_name: Annotated[
        str | None, typer.Option(help="Id clients send as `model` (default: folder name).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, … (hf backend).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (hf backend).")] = "float32",
    instruction: Annotated[
        bool, typer.Option(help="Append npr's format instruction to the last user message by default.")
    ] = False,
    max_batch_requests: Annotated[int, typer.Option(help="Samples decoded together at most.")] = 64,
    max_tokens_limit: Annotated[
        int | None, typer.Option(help="Largest max_tokens accepted (default: context).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    backend: BackendOption = "hf",
) -> None:
    """Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from npr.serve import create_app

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"must be one of {sorted(_DTYPES)}, got {dtype!r}", param_hint="--dtype")
    engine = open_engine(model, backend, max_batch_requests=max_batch_requests)
    if backend == "hf":  # llama.cpp and vLLM place and type their weights themselves
        import torch

        engine.model.to(device=device, dtype=getattr(torch, dtype))
    name = model_name or (TINY if model == TINY else Path(model).name)
    server = create_app(
        engine, model_name=name, format_instruction=instruction, max_tokens_limit=max_tokens_limit
    )
    uvicorn.run(server, host=host, port=port, log_level=log_level)
