"""Small helpers the sub-commands share."""

from __future__ import annotations

from typing import Any

from npr.model import load_model, tiny_model

TINY = "tiny"


def load_any(model: str) -> tuple[Any, Any]:
    """A model folder or named model, or `tiny` for the random test model (handy for smoke runs)."""
    if model == TINY:
        return tiny_model(seed=0)
    return load_model(model)
