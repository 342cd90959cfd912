"""vLLM backend tests (run with `.venv-vllm/bin/pytest tests/vllm`): one tiny model folder for the session.

vLLM's CPU attention needs a head size that is a multiple of 32, so the tiny Qwen3 here has 2 heads of 32
(`tiny_model`'s default 4 heads of 16 is refused at load, see `test_engine.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from npr.model import save_model, tiny_model

TINY_VLLM = {"num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 64 / 2 = 32
SMALL_CACHE = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}  # starts faster than 1 GiB


def tiny_vllm_model():
    return tiny_model(seed=0, **TINY_VLLM)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return save_model(*tiny_vllm_model(), tmp_path_factory.mktemp("tiny") / "model")
