"""RL with vLLM rollouts: after a DAPO step vLLM decodes with the trainer's new weights (and not without the
sync); truncated importance sampling; configs that cannot work are refused when loaded."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import npr.train.rl as rl
from npr.data import Example
from npr.engine.vllm import _drop_stale_process_groups
from npr.model import load_model
from npr.train.config import RLConfig
from npr.train.loop import read_metrics
from npr.train.vllm_sync import tis_weights
from tests.vllm.test_engine import hf_logprobs

FIXED = list(range(40, 72))  # tokens whose log-probs both sides compute


def varied_check(text: str, example: Example) -> bool:
    """'Correct' for about half of all texts (a stable hash), so groups vary and the step moves weights."""
    return zlib.adler32(text.encode()) % 2 == 0


def dapo_config(tmp_path: Path, model: Path, **overrides: Any) -> RLConfig:
    data = tmp_path / "questions.jsonl"
    questions = ["What is 2 + 3?", "What is 7 + 1?"]
    data.write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in questions))
    return RLConfig(
        model_path=str(model),
        data=str(data),
        out_dir=str(tmp_path / "run"),
        algorithm="dapo",
        backend="vllm",
        format_reward=False,  # ±1 from varied_check: groups vary
        dynamic_sampling=False,
        prompts_per_step=2,
        rollouts_per_prompt=4,
        max_steps=1,
        max_new_tokens=24,
        lr=1e-2,
        save_every=0,
        **overrides,
    )


@pytest.fixture(autouse=True)
def forget_stale_groups():
    """The recipe's `close_distributed` destroys torch's default group, which vLLM made and still holds;
    forget vLLM's stale groups after each run so that its exit-time shutdown does not trip on them."""
    yield
    _drop_stale_process_groups()


def train_capturing_engine(config: RLConfig, monkeypatch) -> tuple[Any, Path]:
    """Run the recipe; return its rollout engine (still loaded) and the final checkpoint."""
    engines = []

    def capture(*args: Any) -> Any:
        engines.append(rollout_engine(*args))
        return engines[-1]

    rollout_engine = rl.rollout_engine
    monkeypatch.setattr(rl, "rollout_engine", capture)
    final = rl.train(config, check=varied_check)
    return engines[0], final


def test_after_a_dapo_step_vllm_decodes_with_the_trainers_new_weights(tmp_path, tiny_folder, monkeypatch):
    engine, final = train_capturing_engine(dapo_config(tmp_path, tiny_folder, tis_cap=2.0), monkeypatch)
    trained, _ = load_model(final)
    [metrics] = read_metrics(tmp_path / "run")
    assert metrics["train/updates"] == 1 and metrics["train/logprob_gap"] < 1e-4 and "time/sync" in metrics
    served = engine.score([FIXED])[0]
    torch.testing.assert_close(served, hf_logprobs(trained, FIXED), atol=1e-4, rtol=0)
    initial, _ = load_model(tiny_folder)
    assert max(abs(a - b) for a, b in zip(served, hf_logprobs(initial, FIXED), strict=True)) > 1e-3


def test_without_the_sync_vllm_keeps_the_old_weights(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(rl, "sync_weights", lambda engine, model: None)
    engine, final = train_capturing_engine(dapo_config(tmp_path, tiny_folder), monkeypatch)
    served = engine.score([FIXED])[0]
    initial, _ = load_model(tiny_folder)
    torch.testing.assert_close(served, hf_logprobs(initial, FIXED), atol=1e-4, rtol=0)
    trained, _ = load_model(final)
    assert max(abs(a - b) for a, b in zip(served, hf_logprobs(trained, FIXED), strict=True)) > 1e-3


def test_tis_weights_are_the_capped_ratio_on_trained_tokens_only():
    old = torch.tensor([[0.0, -1.0, -1.0], [-0.5, -0.5, -3.0]])
    sampler = torch.tensor([[-0.5, -1.0, 0.0], [-0.5, -2.0, -0.5]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    # exp(old - sampler): row 0 e^0.5, 1, e^-1; row 1 (first token untrained) 1, e^1.5 -> cap 3, e^-2.5.
    expected = torch.tensor([[torch.e**0.5, 1.0, torch.e**-1], [1.0, 3.0, torch.e**-2.5]])
    torch.testing.assert_close(tis_weights(old, sampler, mask, cap=3.0), expected)
    with pytest.raises(ValueError, match="tis_cap"):
        tis_weights(old, sampler, mask, cap=0.0)


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"backend": "vllm", "algorithm": "papo"}, "sequential mode only"),
        ({"backend": "llamacpp"}, "new weights"),
    ],
)
def test_rl_configs_vllm_cannot_run_are_refused_when_loaded(fields, word):
    with pytest.raises(ValidationError, match=word):
        RLConfig(model_path="m", data="d", out_dir="o", **fields)
