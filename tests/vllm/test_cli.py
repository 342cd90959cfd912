"""`npr sample` (rejection sampling) and `npr eval --mode sequential` end to end with `--backend vllm`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from npr.cli import app

DATA = Path(__file__).parents[1] / "fixtures" / "tiny_math.jsonl"


def test_npr_sample_on_vllm_writes_samples_and_stats(tmp_path, tiny_folder):
    out = tmp_path / "samples.jsonl"
    args = [
        "sample",
        "--model",
        str(tiny_folder),
        "--data",
        str(DATA),
        "--out",
        str(out),
        "--backend",
        "vllm",
    ]
    args += ["-k", "2", "--limit", "3", "--max-new-tokens", "12", "--prompt-style", "short", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stats = json.loads(out.with_name("samples.stats.json").read_text())["stats"]
    assert stats["problems"] == 3 and stats["samples"] == 6, stats  # a random model: every try is spent
    assert out.is_file()


def test_npr_eval_sequential_on_vllm_writes_a_result_folder(tmp_path, tiny_folder):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_folder), "--data", str(DATA), "--out", str(out), "--backend", "vllm"]
    args += ["--mode", "sequential", "-k", "2", "--limit", "2", "--max-new-tokens", "12", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    files = {p.name for p in out.iterdir()}
    assert files, result.output
    text = " ".join(p.read_text() for p in out.iterdir() if p.suffix in (".json", ".jsonl", ".md"))
    assert "vllm" in text and "sequential" in text


def test_npr_eval_parallel_on_vllm_is_a_usage_error_naming_the_backends(tmp_path, tiny_folder):
    args = ["eval", "--model", str(tiny_folder), "--data", str(DATA), "--out", str(tmp_path / "e")]
    args += ["--backend", "vllm", "--mode", "parallel", "-k", "1", "--limit", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "'hf' or 'llamacpp'" in (result.output + str(result.exception))
