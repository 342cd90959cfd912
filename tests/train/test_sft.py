"""Parallel SFT: killed-and-resumed = unbroken, it learns to fork, the shipped tiny config runs from the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import npr.cli.train  # noqa: F401  registers `npr train`
from npr.cli import app
from npr.data import DataError
from npr.engine import ParallelEngine, SamplingParams
from npr.format import Block, Item, TagIds, Trajectory, render
from npr.model import load_model, tiny_model
from npr.train import sft
from npr.train.checkpoint import latest_checkpoint
from npr.train.config import ConfigError, SFTConfig
from npr.train.loop import read_metrics
from npr.train.losses import sft_loss
from npr.train.sequences import layout_forward, make_batch
from npr.train.sft import Plan, load_sft_examples, micro_batches, plan_steps, train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SUMS = [(2, 3), (4, 4), (6, 1), (3, 5), (7, 2), (1, 8), (5, 4), (9, 0)]


def trace(a: int, b: int) -> str:
    """A canonical two-branch trace for a + b, rendered by the format module."""
    s = a + b
    block = Block(
        plans=(Item("1", f"add {a} and {b}"), Item("2", f"count up from {b}")),
        steps=(Item("1", f"{a} + {b} = {s}"), Item("2", f"{b} and {a} more is {s}")),
        takeaway=f"both give {s}",
    )
    return render(Trajectory((block,), f"so \\boxed{{{s}}}"))


def write_data(path: Path, sums: list[tuple[int, int]]) -> Path:
    """Accepted samples with short raw prompts (`prompt_ids`), so the tiny model trains in milliseconds."""
    _, tokenizer = tiny_model()
    rows = [
        {
            "question": f"{a} + {b}?",
            "response": trace(a, b),
            "prompt_ids": tokenizer(f"{a} + {b}?")["input_ids"],
        }
        for a, b in sums
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_config(tmp_path: Path, sums: list[tuple[int, int]], **overrides: Any) -> SFTConfig:
    fields: dict[str, Any] = {
        "model_path": "tiny",
        "data_path": str(write_data(tmp_path / "data.jsonl", sums)),
        "out_dir": str(tmp_path / "run"),
        "lr": 1e-3,
        "lr_end": 1e-4,
        "weight_decay": 0.1,
        "batch_size": 2,
        "save_every": 0,
    }
    return SFTConfig(**{**fields, **overrides})


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def weights_of_seed() -> dict[str, torch.Tensor]:
    model, _ = tiny_model()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_killed_and_resumed_run_ends_with_the_weights_of_an_unbroken_run(tmp_path, monkeypatch):
    # 6 examples, 2 per step: 3 steps per epoch, 2 epochs, a checkpoint every 2 steps.
    overrides = {"epochs": 2, "save_every": 2, "schedule": "cosine"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unbroken = train(sft_config(tmp_path / "a", SUMS[:6], **overrides))
    resumed_config = sft_config(tmp_path / "b", SUMS[:6], **overrides)

    clip = sft.clip_gradients
    calls = []

    def killed_in_step_5(*args):  # after the step-4 checkpoint, in the second epoch
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return clip(*args)

    monkeypatch.setattr(sft, "clip_gradients", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_config)
    assert latest_checkpoint(resumed_config.out_dir).name == "step-000004"
    monkeypatch.setattr(sft, "clip_gradients", clip)
    resumed = train(resumed_config)

    assert unbroken.name == resumed.name == "step-000006"
    a, b = weights(unbroken), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], weights_of_seed()["model.norm.weight"])  # it trained
    logged_a, logged_b = read_metrics(tmp_path / "a" / "run"), read_metrics(resumed_config.out_dir)
    assert [m["step"] for m in logged_b] == [1, 2, 3, 4, 5, 6]  # step 5's first try was dropped
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens"):
        assert [m[key] for m in logged_a] == [m[key] for m in logged_b], key


@torch.no_grad()
def set_loss(model, tokenizer, data_path: str) -> float:
    """Token-mean NLL of the responses in `data_path` under parallel SFT's mask and positions."""
    examples, _ = load_sft_examples(data_path, tokenizer, parallel=True, max_len=4096)
    batch = make_batch(examples, TagIds.from_tokenizer(tokenizer), tokenizer.pad_token_id)
    return sft_loss(layout_forward(model, batch), batch.layout.input_ids, batch.loss_mask).item()


def test_parallel_sft_lowers_the_loss_and_the_trained_model_forks(tmp_path):
    sums = SUMS[:4]
    config = sft_config(
        tmp_path, sums, schedule="constant", weight_decay=0.0, batch_size=4, epochs=120, log_every=10
    )
    final = train(config)
    model, tokenizer = load_model(final)
    before = set_loss(tiny_model()[0], tokenizer, config.data_path)
    assert before > 6.0  # a random model over a ~1000-token vocabulary: about ln(1032) = 6.9
    assert set_loss(model, tokenizer, config.data_path) < 0.05 * before

    prompts = [json.loads(line)["prompt_ids"] for line in Path(config.data_path).read_text().splitlines()]
    rollouts = ParallelEngine(model, tokenizer).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=80), mode="parallel"
    )
    for rollout, (a, b) in zip(rollouts, sums, strict=True):
        assert rollout.stats.forks >= 1 and rollout.stats.branches >= 2
        assert rollout.answer == str(a + b)


def test_sequential_sft_trains_the_same_response_tokens_causally(tmp_path):
    _, tokenizer = tiny_model()
    data = write_data(tmp_path / "data.jsonl", SUMS[:2])
    parallel, _ = load_sft_examples(data, tokenizer, parallel=True, max_len=4096)
    sequential, _ = load_sft_examples(data, tokenizer, parallel=False, max_len=4096)
    tags = TagIds.from_tokenizer(tokenizer)
    assert [e.response_ids for e in parallel] == [e.response_ids for e in sequential]
    p = make_batch(parallel, tags, tokenizer.pad_token_id).layout
    s = make_batch(sequential, tags, tokenizer.pad_token_id).layout
    assert torch.equal(p.input_ids, s.input_ids)
    n = int(s.token_mask[0].sum())
    assert s.position_ids[0, :n].tolist() == list(range(n))
    assert p.position_ids[0, :n].tolist() != list(range(n))  # branches restart after </guideline>
    # Without prompt_ids, each mode gets its own instruction (as the evaluation prompts them).
    data.write_text(json.dumps({"question": "1 + 1?", "response": trace(1, 1)}) + "\n")
    [with_format], _ = load_sft_examples(data, tokenizer, parallel=True, max_len=4096)
    [plain], _ = load_sft_examples(data, tokenizer, parallel=False, max_len=4096)
    [short], _ = load_sft_examples(data, tokenizer, parallel=True, max_len=4096, style="short")
    assert len(with_format.prompt_ids) > len(plain.prompt_ids)
    assert len(with_format.prompt_ids) > len(short.prompt_ids)
    assert with_format.response_ids == plain.response_ids


def test_bad_data_is_reported_with_its_file_and_line(tmp_path):
    _, tokenizer = tiny_model()
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "response": trace(1, 2)}) + "\n" + '{"question": "q"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'response'"):
        load_sft_examples(data, tokenizer, parallel=True, max_len=4096)
    data.write_text(
        json.dumps({"question": "q", "response": "<step>1: no guideline</step> \\boxed{3}"}) + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:1: response is not in the parallel format"):
        load_sft_examples(data, tokenizer, parallel=True, max_len=4096)
    [plain], _ = load_sft_examples(data, tokenizer, parallel=False, max_len=4096)  # trained as written
    assert plain.response_ids[-1] == tokenizer.eos_token_id
    examples, too_long = load_sft_examples(data, tokenizer, parallel=False, max_len=10)
    assert (examples, too_long) == ([], 1)
    with pytest.raises(DataError, match="fewer than one global batch of 4"):
        plan_steps(sft_config(tmp_path, SUMS[:3], batch_size=2, grad_accum=2), 3, world=1)


def test_each_step_splits_one_global_batch_over_processes_and_micro_batches():
    plan = Plan(examples=10, global_batch=4, steps_per_epoch=2, total_steps=6)
    for step in range(plan.total_steps):
        alone = micro_batches(plan, seed=3, step=step, rank=0, world=1, grad_accum=1)
        split = [
            micro_batches(plan, seed=3, step=step, rank=rank, world=2, grad_accum=2) for rank in range(2)
        ]
        assert all(len(mb) == 1 for shards in split for mb in shards)
        assert sorted(i for shards in split for mb in shards for i in mb) == sorted(alone[0])
    epoch = [i for step in (0, 1) for i in micro_batches(plan, 3, step, 0, 1, 1)[0]]
    assert len(set(epoch)) == 8  # an epoch draws without replacement (2 of 10 are left for the next)
    assert epoch != [i for step in (2, 3) for i in micro_batches(plan, 3, step, 0, 1, 1)[0]]


def test_cli_runs_the_shipped_tiny_config(tmp_path):
    config = yaml.safe_load((CONFIGS / "tiny_sft.yaml").read_text())
    config.update(
        out_dir=str(tmp_path / "run"), data_path=str(CONFIGS.parent / config["data_path"]), max_steps=2
    )
    path = tmp_path / "tiny_sft.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", "sft", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("step-000002")
    logged = read_metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [1, 2]
    assert logged[0]["train/loss"] == pytest.approx(6.8873, abs=1e-3)  # seed 0, float32, first batch
    assert logged[1]["train/loss"] < logged[0]["train/loss"]

    path.write_text(yaml.safe_dump({**config, "lr": -1}))
    result = CliRunner().invoke(app, ["train", "sft", str(path)])
    assert result.exit_code == 2 and "lr" in result.output


def test_flex_attention_cannot_train_on_cpu(tmp_path):
    with pytest.raises(ConfigError, match="flex cannot train on cpu"):
        train(sft_config(tmp_path, SUMS[:2], attention="flex"))


def test_bf16_autocast_with_activation_checkpointing_trains_and_keeps_float32_weights(tmp_path):
    config = sft_config(tmp_path, SUMS[:4], precision="bf16", activation_checkpointing=True, max_steps=2)
    final = train(config)
    logged = read_metrics(config.out_dir)
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in logged)
    first = logged[0]["train/loss"]
    assert abs(first - 6.9) < 0.3  # a random model: about ln(vocab), computed in float32 from bf16 logits
    w = weights(final)
    assert all(v.dtype == torch.float32 for v in w.values())
    assert not torch.equal(w["model.norm.weight"], weights_of_seed()["model.norm.weight"])
