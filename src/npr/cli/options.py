"""Options several commands share, and the one place a command turns `--model/--backend` into an engine."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from npr.engine import BACKENDS

BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Decoding engine: hf (PyTorch, the reference), llamacpp (llama.cpp, exact; `make llamacpp`) "
        "or vllm (sequential mode only; `make vllm`).",
    ),
]


def open_engine(model: str, backend: str, **options: Any) -> Any:
    """`load_engine`, with a bad backend or model reported as a usage error naming the option."""
    from npr.engine import load_engine

    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"must be one of {', '.join(BACKENDS)}, got {backend!r}", param_hint="--backend"
        )
    try:
        return load_engine(model, backend, **options)
    except FileNotFoundError as exc:  # no such model or GGUF
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    except (ImportError, ValueError) as exc:  # backend not installed; a model or file the backend refuses
        raise typer.BadParameter(str(exc), param_hint="--backend") from None
