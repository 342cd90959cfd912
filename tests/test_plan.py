"""`npr plan`: the memory estimate of the paper's Qwen3-4B stage-2 config, one row checked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import npr.cli.plan  # noqa: F401  registers `npr plan`
from npr.cli import app
from npr.plan import GIB, load_model_config, model_shape, plan_table, workload
from npr.train.config import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QWEN3_4B = CONFIGS / "paper" / "qwen3-4b"


def test_fsdp_flex_row_of_the_stage_2_config_by_hand() -> None:
    config = load_train_config(CONFIGS / "paper" / "npr_beta_sft.yaml")
    shape = model_shape(load_model_config(config, QWEN3_4B))
    assert shape.params == 4_022_468_096  # Qwen3-4B, embeddings tied to the LM head
    work = workload(config)
    assert (work.rows, work.row_tokens) == (1, 32768)  # one packed row of 32k tokens per pass
    row = next(
        r
        for r in plan_table(config, shape, 8, 80.0)
        if (r["distributed"], r["attention"]) == ("fsdp", "flex")
    )
    p = 4_022_468_096
    assert row["params"] == pytest.approx(p * 4 / 8 / GIB)  # float32 master weights over 8 GPUs
    assert row["optimizer"] == pytest.approx(2 * p * 4 / 8 / GIB)  # AdamW's two moments
    # Checkpointed activations in bf16: every layer's input (36 × 2560) plus one layer's full set
    # (2·2560 + 2·4096 + 2·1024 + 3·9728 = 44544 values) per token.
    assert row["activations"] == pytest.approx(2 * 32768 * (36 * 2560 + 44544) / GIB)
    assert row["logits"] == pytest.approx(32768 * 151936 * (2 + 4) / GIB)  # bf16 logits + float32 log-softmax
    assert row["mask"] == pytest.approx(16 * 256**2 / GIB)  # (32768 / 128)² tiles
    parts = ("params", "grads", "optimizer", "gathered", "activations", "logits", "mask")
    assert row["total"] == pytest.approx(sum(row[k] for k in parts))
    dense = next(
        r
        for r in plan_table(config, shape, 8, 80.0)
        if (r["distributed"], r["attention"]) == ("fsdp", "dense")
    )
    assert dense["mask"] == pytest.approx(32768**2 * 2 / GIB)  # a 2 GiB bf16 [1, 1, L, L] mask


def test_cli_prints_the_table_and_names_a_missing_model_config() -> None:
    args = ["plan", str(CONFIGS / "paper" / "npr_papo.yaml"), "--gpus", "8", "--gpu-mem", "80"]
    result = CliRunner().invoke(app, [*args, "--model-config", str(QWEN3_4B)])
    assert result.exit_code == 0, result.output
    assert "4.02 B parameters" in result.output
    assert sum(line.startswith(("ddp", "fsdp")) for line in result.output.splitlines()) == 4
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--model-config" in result.output
