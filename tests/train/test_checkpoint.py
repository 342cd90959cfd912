"""Checkpoints: save → load restores everything, resume = unbroken, atomic folders, pruning."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from npr.train.checkpoint import (
    CONFIG_FILE,
    LATEST_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    resolve_model_dir,
    save_checkpoint,
)

CONFIG = {"seed": 7, "lr": 1e-3}


def _model(seed: int, tie: bool = False) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=tie,
    )
    return Qwen3ForCausalLM(config)


def _trainer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def _train_step(model, optimizer, scheduler) -> None:
    """One update on a batch drawn from all three global RNGs, so a resume must restore each of them."""
    length = 5 + random.randrange(3) + int(np.random.randint(2))
    ids = torch.randint(0, 64, (2, length))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), *torch.rand(3).tolist()]


def _save(run_dir, model, optimizer, scheduler, step, keep_last=2):
    return save_checkpoint(
        run_dir,
        model,
        None,
        optimizer,
        scheduler,
        step,
        {"index": step * 4},
        CONFIG,
        {"note": "x"},
        keep_last,
    )


def _assert_same_weights(a, b) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("tie", [False, True])
def test_save_then_load_restores_weights_optimizer_scheduler_and_rng(tmp_path, tie):
    model = _model(0, tie)
    optimizer, scheduler = _trainer(model)
    _train_step(model, optimizer, scheduler)
    path = _save(tmp_path, model, optimizer, scheduler, step=1)
    after_save = _draws()

    fresh = _model(1, tie)
    fresh_optimizer, fresh_scheduler = _trainer(fresh)
    state = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)

    assert _draws() == after_save
    _assert_same_weights(fresh, model)
    if tie:
        assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    saved_opt, loaded_opt = optimizer.state_dict(), fresh_optimizer.state_dict()
    for group in loaded_opt["param_groups"]:  # stored by parameter name, betas come back as a list
        group["betas"] = tuple(group["betas"])
    assert saved_opt["param_groups"] == loaded_opt["param_groups"]
    for key, moments in saved_opt["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, loaded_opt["state"][key][name]), (key, name)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert (state.step, state.data_position, state.extra, state.config) == (
        1,
        {"index": 4},
        {"note": "x"},
        CONFIG,
    )


def test_resumed_run_ends_identical_to_unbroken_run(tmp_path):
    random.seed(0)
    np.random.seed(0)
    unbroken = _model(0)
    optimizer, scheduler = _trainer(unbroken)
    for step in range(1, 5):
        _train_step(unbroken, optimizer, scheduler)
        if step == 2:
            _save(tmp_path, unbroken, optimizer, scheduler, step)

    resumed = _model(3)  # a new process: different init, fresh optimizer, RNGs elsewhere
    random.seed(123)
    np.random.seed(123)
    optimizer, scheduler = _trainer(resumed)
    state = load_checkpoint(latest_checkpoint(tmp_path), resumed, optimizer, scheduler)
    for _ in range(state.step + 1, 5):
        _train_step(resumed, optimizer, scheduler)
    _assert_same_weights(resumed, unbroken)


def test_folder_is_a_save_pretrained_folder_with_its_config(tmp_path):
    model = _model(0)
    optimizer, scheduler = _trainer(model)
    path = _save(tmp_path, model, optimizer, scheduler, step=123)
    assert path == tmp_path / "step-000123"
    assert (tmp_path / LATEST_FILE).read_text() == "step-000123\n"
    _assert_same_weights(Qwen3ForCausalLM.from_pretrained(path), model)
    summary = json.loads((path / CONFIG_FILE).read_text())
    assert (summary["step"], summary["seed"], summary["config"]) == (123, 7, CONFIG)
    assert {"python", "torch", "transformers", "npr"} <= set(summary["versions"])


def test_keeps_the_last_n_and_points_latest_at_the_newest(tmp_path):
    model = _model(0)
    optimizer, scheduler = _trainer(model)
    for step in range(1, 5):
        _save(tmp_path, model, optimizer, scheduler, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"


def test_saving_a_step_again_replaces_it(tmp_path):
    model = _model(0)
    optimizer, scheduler = _trainer(model)
    _save(tmp_path, model, optimizer, scheduler, step=2)
    _train_step(model, optimizer, scheduler)
    path = _save(tmp_path, model, optimizer, scheduler, step=2)
    fresh = _model(1)
    load_checkpoint(path, fresh)
    _assert_same_weights(fresh, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000002"]


def test_interrupted_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    model = _model(0)
    optimizer, scheduler = _trainer(model)
    _save(tmp_path, model, optimizer, scheduler, step=1)
    real_save = model.save_pretrained

    def save_then_crash(directory, **kwargs):
        real_save(directory, **kwargs)  # the weights are on disk when the crash comes
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, optimizer, scheduler, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path):
    model = _model(0)
    optimizer, scheduler = _trainer(model)
    _save(tmp_path, model, optimizer, scheduler, step=1)
    leftover = tmp_path / ".tmp-abc123"  # what a SIGKILL during save leaves behind
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / "step-000002").mkdir()  # no trainer_state.pt: not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    _save(tmp_path, model, optimizer, scheduler, step=3)
    assert not leftover.exists()


def test_latest_falls_back_to_the_highest_folder(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    model = _model(0)
    optimizer, scheduler = _trainer(model)
    _save(tmp_path, model, optimizer, scheduler, step=5)
    (tmp_path / LATEST_FILE).unlink()  # killed between the folder rename and the pointer
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000005"
    assert resolve_model_dir(tmp_path) == tmp_path / "step-000005"
    assert resolve_model_dir(tmp_path / "step-000005") == tmp_path / "step-000005"


def test_load_errors_name_the_folder(tmp_path):
    model = _model(0)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a checkpoint: {STATE_FILE}"):
        load_checkpoint(tmp_path, model)
    optimizer, _ = _trainer(model)
    path = save_checkpoint(tmp_path, model, None, optimizer, None, 1, 0, CONFIG)
    with pytest.raises(ValueError, match="saved without a scheduler"):
        load_checkpoint(path, model, optimizer, _trainer(model)[1])
    with pytest.raises(ValueError, match="weights do not match the model"):
        load_checkpoint(path, torch.nn.Linear(2, 2))
