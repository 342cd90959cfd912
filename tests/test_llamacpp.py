"""The llama.cpp backend against the reference engine: same tokens, same log-probs, exact layout; and the
errors a user meets with a wrong file. (Budgets, cancel, abort and the fuzz run on both backends in
tests/test_engine.py; parity in tests/test_engine_parity.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

import npr
from npr.cli import app
from npr.engine import FinishReason, ParallelEngine, SamplingParams, load_engine
from npr.engine.loader import LlamaCppEngine
from npr.format import TagIds
from npr.model import tiny_model
from tests.conftest import assert_no_leak
from tests.scripted import PerPrompt, Script
from tests.test_engine_parity import MIXED_SHAPES as SHAPES
from tests.test_engine_parity import assert_parity, prompts

DEMO_SEED = Path(npr.__file__).parent / "assets" / "demo_seed"


@pytest.fixture(scope="module")
def pair(tiny_gguf):
    model, tok = tiny_model(seed=0)
    hf = ParallelEngine(model, tok)
    llama = LlamaCppEngine(tiny_gguf, tok, n_threads=1)
    yield model, tok, hf, llama
    assert_no_leak(llama)


def both(pair, ps, params, mode):
    _, _, hf, llama = pair
    return hf.generate(ps, params, mode=mode), llama.generate(ps, params, mode=mode)


def max_logprob_gap(a, b) -> float:
    return (torch.tensor(a.sampled_logprobs) - torch.tensor(b.sampled_logprobs)).abs().max().item()


def test_greedy_sequential_tokens_and_logprobs_equal(pair):
    _, tok, _, _ = pair
    params = SamplingParams(temperature=0.0, max_new_tokens=40, branch_repetition_penalty=1.0)
    for a, b in zip(*both(pair, prompts(tok, 8), params, "sequential"), strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert max_logprob_gap(a, b) <= 1e-3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_forks_in_a_mixed_batch_decode_identically(pair, temperature):
    """1-5 branches, unequal lengths, two blocks, eight requests in one batch: the same tokens and positions;
    at temperature 1 the same seed draws the same tokens (our sampler on both backends' logits)."""
    model, tok, _, llama = pair
    ps = prompts(tok, len(SHAPES))
    proc = PerPrompt({tuple(p): Script(tok, s) for p, s in zip(ps, SHAPES, strict=True)})
    params = SamplingParams(temperature=temperature, seed=11, max_new_tokens=400, logits_processors=[proc])
    tags = TagIds.from_tokenizer(tok)
    for a, b, shape in zip(*both(pair, ps, params, "parallel"), SHAPES, strict=True):
        assert b.finish_reason == FinishReason.STOP
        assert [len(x.branches) for x in b.blocks] == [len(x) for x in shape]
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
        assert max_logprob_gap(a, b) <= 1e-3
        assert_parity(model, tags, b, atol=1e-3)  # one HF layout forward reproduces llama.cpp's log-probs
    assert llama.pool.live_sequences() == 0


def test_abort_all_frees_every_sequence(pair):
    _, tok, _, llama = pair
    params = SamplingParams(max_new_tokens=200, logits_processors=[Script(tok, [[9, 9, 9]])])
    handles = [h for p in prompts(tok, 4) for h in llama.add_request(p, params)]
    while not all(h.open_branches for h in handles):  # into the branches
        llama.step()
    llama.step()
    assert llama.pool.live_sequences() > 4
    llama.abort_all()
    assert not llama.has_work and llama.pool.live_sequences() == 0 and len(llama.pool) == 0
    (r,) = llama.generate(prompts(tok, 1), SamplingParams(max_new_tokens=4, seed=0))
    assert r.finish_reason == FinishReason.LENGTH


def test_requests_beyond_the_cache_are_refused_or_queued(tiny_gguf):
    _, tok = tiny_model(seed=0)
    small = LlamaCppEngine(tiny_gguf, tok, n_ctx=256, n_seq_max=16, n_threads=1)
    (p,) = prompts(tok, 1)
    with pytest.raises(ValueError, match="n_ctx=256"):
        small.add_request(p, SamplingParams(max_new_tokens=400))
    with pytest.raises(ValueError, match="n_seq_max=16"):
        small.add_request(p, SamplingParams(max_new_tokens=64, max_plans=16))
    assert not small.has_work
    # Three requests of 100 cells each: two fit the 256 cells at a time, the third waits its turn.
    params = SamplingParams(max_new_tokens=100 - len(p), seed=1, logits_processors=[Script(tok, [[3, 4]])])
    handles = [h for _ in range(3) for h in small.add_request(p, params)]
    small.step()
    assert small.stats().running == 2 and small.stats().waiting == 1
    while small.has_work:
        small.step()
    assert all(h.finish_reason == FinishReason.STOP for h in handles)
    assert small.pool.live_sequences() == 0


def test_missing_corrupt_and_foreign_ggufs_are_refused_by_name(tiny_gguf, tmp_path):
    _, tok = tiny_model(seed=0)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        LlamaCppEngine(tmp_path / "nowhere.gguf", tok)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="corrupt.gguf"):
        LlamaCppEngine(corrupt, tok)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated.gguf"):
        LlamaCppEngine(truncated, tok)
    bigger = AutoTokenizer.from_pretrained(tiny_gguf.parent / "model")
    bigger.add_tokens(["<extra>"])  # one token the GGUF lacks
    with pytest.raises(ValueError, match="the GGUF vocabulary has 1011 tokens but the tokenizer has 1012"):
        LlamaCppEngine(tiny_gguf, bigger)
    with pytest.raises(
        ValueError, match=r"tag <plan> is token 1006 in the tokenizer, but the GGUF has '</plan>'"
    ):
        LlamaCppEngine(tiny_gguf, swapped_tags(tiny_gguf.parent / "model", tmp_path))


def swapped_tags(folder: Path, tmp_path: Path):
    """The tiny tokenizer with <plan> and </plan> trading ids: same size, tags where the GGUF has others."""
    data = json.loads((folder / "tokenizer.json").read_text())
    by_content = {t["content"]: t for t in data["added_tokens"]}
    a, b = by_content["<plan>"], by_content["</plan>"]
    a["content"], b["content"] = b["content"], a["content"]
    (tmp_path / "swapped").mkdir()
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp_path / "swapped" / f.name)
    (tmp_path / "swapped" / "tokenizer.json").write_text(json.dumps(data))
    return AutoTokenizer.from_pretrained(tmp_path / "swapped")


def test_load_engine_exports_once_and_reuses_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NPR_CACHE", str(tmp_path / "cache"))
    engine = load_engine("tiny", backend="llamacpp", n_threads=1)
    (gguf,) = (tmp_path / "cache" / "gguf").glob("*.gguf")
    stamp = gguf.stat().st_mtime_ns
    again = load_engine("tiny", backend="llamacpp", n_threads=1)
    assert gguf.stat().st_mtime_ns == stamp and again.pool.path == gguf == engine.pool.path
    with pytest.raises(ValueError, match="unknown backend 'mlx'"):
        load_engine("tiny", backend="mlx")


def test_export_command_writes_a_gguf_llama_cpp_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("NPR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tiny-q8.gguf"
    result = CliRunner().invoke(app, ["export", "gguf", "tiny", str(out), "--dtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    _, tok = tiny_model(seed=0)
    (r,) = LlamaCppEngine(out, tok, n_threads=1).generate(
        prompts(tok, 1), SamplingParams(max_new_tokens=5, seed=0)
    )
    assert r.stats.total_tokens == 5
    bad = CliRunner().invoke(app, ["export", "gguf", str(tmp_path / "nowhere"), str(out)])
    assert bad.exit_code == 2 and "nowhere" in bad.output
    bad = CliRunner().invoke(app, ["export", "gguf", "tiny", str(out), "--dtype", "f8"])
    assert bad.exit_code == 2 and "--dtype" in bad.output


def test_an_architecture_llama_cpp_lacks_is_named(tmp_path):
    from npr.export import export_gguf
    from npr.model import save_model

    model, tok = tiny_model(seed=0)
    folder = save_model(model, tok, tmp_path / "model")
    config = (folder / "config.json").read_text().replace("Qwen3ForCausalLM", "NoSuchModelForCausalLM")
    (folder / "config.json").write_text(config)
    with pytest.raises(RuntimeError, match="NoSuchModelForCausalLM"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_generate_cli_runs_on_llamacpp(tmp_path, monkeypatch):
    monkeypatch.setenv("NPR_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        app,
        ["generate", "-p", "2+3?", "--backend", "llamacpp", "--max-new-tokens", "6", "--seed", "0", "--raw"],
    )
    assert result.exit_code == 0, result.output
    assert "finish=length tokens=6" in result.output
    bad = CliRunner().invoke(app, ["generate", "-p", "x", "--backend", "mlx"])
    assert bad.exit_code == 2 and "--backend" in bad.output


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_on_chat_prompts(tmp_path):
    """SmolLM2-135M with tags, exported to f32: 32 greedy tokens on 10 chat prompts. A divergence must be a
    near-tie of the two best logits (both engines are right to the last few ulps)."""
    from npr.data import encode_messages

    hf = load_engine("smollm2-135m-instruct", backend="hf")
    llama = load_engine("smollm2-135m-instruct", backend="llamacpp", n_threads=2)
    questions = [
        "What is 17 + 25?",
        "Name three primary colours.",
        "Write a haiku about the sea.",
        "What is the capital of France?",
        "Explain photosynthesis in one sentence.",
        "List the first five prime numbers.",
        "How many legs does a spider have?",
        "Translate 'good morning' into Spanish.",
        "What is 12 times 12?",
        "Give one tip for learning to code.",
    ]
    ids = [encode_messages(hf.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0.0, max_new_tokens=32, branch_repetition_penalty=1.0)
    diverged = 0
    for a, b in zip(
        hf.generate(ids, params, "sequential"), llama.generate(ids, params, "sequential"), strict=True
    ):
        if a.token_ids == b.token_ids:
            assert max_logprob_gap(a, b) <= 2e-3
            continue
        diverged += 1
        at = next(i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y)
        context = a.prompt_ids + a.token_ids[:at]
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([context])).logits[0, -1]
        top2 = torch.topk(torch.log_softmax(logits.float(), -1), 2).values
        assert (top2[0] - top2[1]).item() < 1e-2, f"divergence at token {at} is not a near-tie"
    assert diverged <= 2


def test_sample_and_eval_commands_run_on_llamacpp(tmp_path, monkeypatch):
    """Rejection sampling and evaluation drive llama.cpp through the same engine API."""
    monkeypatch.setenv("NPR_CACHE", str(tmp_path / "cache"))
    data = Path(__file__).parent / "fixtures" / "tiny_math.jsonl"
    out = tmp_path / "samples.jsonl"
    args = ["sample", "--model", "tiny", "--data", str(data), "--out", str(out), "--backend", "llamacpp"]
    result = CliRunner().invoke(
        app, [*args, "--k", "2", "--limit", "2", "--max-new-tokens", "8", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    summary = result.output[result.output.index('{"k"') :].splitlines()[0]  # after the export's progress bar
    assert json.loads(summary)["samples"] == 4
    args = [
        "eval",
        "--model",
        "tiny",
        "--data",
        str(data),
        "-k",
        "1",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
    ]
    result = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "eval"), "--backend", "llamacpp", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "eval" / "summary.json").read_text())["settings"]["info"]["backend"]
        == "llamacpp"
    )
