"""Suite-wide settings and fixtures: tiny models run fastest on one thread (the CI box has two cores), and
the tiny model's GGUF export is made once per session for the llama.cpp backend's tests."""

from __future__ import annotations

import pytest
import torch

from npr.engine import DecodingEngine, ParallelEngine

torch.set_num_threads(1)

BACKENDS = ["hf", "llamacpp"]
"""Backends that decode both modes; every engine behaviour test runs on each."""


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """`tiny_model(seed=0)` as an f32 GGUF (the exact export)."""
    from npr.export import export_gguf
    from npr.model import save_model, tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    save_model(*tiny_model(seed=0), folder / "model")
    return export_gguf(folder / "model", folder / "tiny-f32.gguf", "f32")


def make_engine(backend: str, model, tokenizer, gguf=None, **options) -> DecodingEngine:
    """An engine on `backend` for the tiny model (`gguf`: its export, for llama.cpp)."""
    if backend == "hf":
        return ParallelEngine(model, tokenizer, **options)
    from npr.engine.loader import LlamaCppEngine

    return LlamaCppEngine(gguf, tokenizer, n_threads=1, **options)


def assert_no_leak(engine: DecodingEngine) -> None:
    """Once idle, a llama.cpp engine holds no sequence and no cell."""
    if engine.backend == "llamacpp" and not engine.has_work:
        assert engine.pool.live_sequences() == 0 and len(engine.pool) == 0
