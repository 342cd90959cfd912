"""The central invariant (DESIGN §3): one forward over prompt+response with the layout's mask and positions
reproduces the engine's log-probs, in every decoding mode."""

from __future__ import annotations

import pytest
import torch

from npr.engine import FinishReason, Rollout, SamplingParams
from npr.format import TagIds, check
from npr.layout import build_layout
from npr.model import tiny_model
from tests.conftest import BACKENDS, assert_no_leak, make_engine
from tests.scripted import PerPrompt, Script

ATOL = {"hf": 1e-4, "llamacpp": 1e-3}  # llama.cpp: its own kernels, an f32 KV cache (DESIGN §10)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="module", params=BACKENDS)
def setup(request, tiny):
    """The same checks on every backend: our engine on HF, and llama.cpp on the model's exact export."""
    model, tok = tiny
    gguf = request.getfixturevalue("tiny_gguf") if request.param == "llamacpp" else None
    engine = make_engine(request.param, model, tok, gguf)
    yield model, tok, TagIds.from_tokenizer(tok), engine
    assert_no_leak(engine)


MIXED_SHAPES = [
    [[3]],
    [[2, 6]],
    [[1, 4, 2], [3, 3]],
    [[5, 1, 1, 2]],
    [[2, 2, 2, 2, 2]],
    [[7], [1, 2]],
    [[4, 4]],
    [[2]],
]
"""Eight fork shapes for one ragged batch: 1-5 branches, unequal lengths, one or two blocks."""


def layout_logprobs(model, tags: TagIds, r: Rollout) -> torch.Tensor:
    """Log-prob of every response token from ONE forward with the layout (what the trainer computes)."""
    lay = build_layout(r.prompt_ids + r.token_ids, tags, len(r.prompt_ids), parallel=r.mode == "parallel")
    assert lay.position_ids.tolist() == r.position_ids
    with torch.no_grad():
        logits = model(
            input_ids=lay.token_ids[None],
            position_ids=lay.position_ids[None],
            attention_mask=lay.attention_mask(),
        ).logits[0]
    lp = torch.log_softmax(logits.float(), -1)  # [L, V]
    p = len(r.prompt_ids)
    return lp[p - 1 : -1].gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]  # [T]


def assert_parity(model, tags, r: Rollout, atol: float = ATOL["hf"]) -> None:
    ref = layout_logprobs(model, tags, r)
    mask = torch.tensor(r.loss_mask, dtype=torch.bool)
    got = torch.tensor(r.sampled_logprobs)
    assert mask.sum() > 0
    err = (ref[mask] - got[mask]).abs().max().item()
    assert err < atol, f"parity error {err}"
    assert (got[~mask] == 0).all()


def prompts(tok, n):
    return [
        tok(f"question number {i}: what is {i}+{i}?", add_special_tokens=False)["input_ids"] for i in range(n)
    ]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize(
    "lens", [[[4]], [[3, 7]], [[2, 5, 3], [4, 1]], [[1, 2, 3, 4], [6]], [[5, 1, 4, 2, 3]]]
)
def test_parity_each_fork_width(setup, mode, lens):
    model, tok, tags, engine = setup
    params = SamplingParams(seed=3, max_new_tokens=400, logits_processors=[Script(tok, lens)])
    (r,) = engine.generate(prompts(tok, 1), params, mode=mode)
    assert r.finish_reason == FinishReason.STOP, r.stop_reason
    assert check(r.text).issues == () or all(i.code.startswith("short") for i in check(r.text).issues)
    if mode == "parallel":
        assert r.stats.forks == len(lens)
        assert [len(b.branches) for b in r.blocks] == [len(x) for x in lens]
        assert (r.stats.critical_path_tokens < r.stats.total_tokens) == any(len(x) > 1 for x in lens)
    else:
        assert r.stats.forks == 0 and r.position_ids == list(range(len(r.position_ids)))
    assert_parity(model, tags, r, ATOL[engine.backend])


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_parity_mixed_batch(setup, mode):
    """Eight requests with different fork shapes and prompt lengths in one ragged batch."""
    model, tok, tags, engine = setup
    shapes = MIXED_SHAPES
    ps = prompts(tok, len(shapes))
    proc = PerPrompt({tuple(p): Script(tok, s) for p, s in zip(ps, shapes, strict=True)})
    params = SamplingParams(seed=11, max_new_tokens=400, logits_processors=[proc])
    rollouts = engine.generate(ps, params, mode=mode)
    for r, shape in zip(rollouts, shapes, strict=True):
        assert r.finish_reason == FinishReason.STOP
        if mode == "parallel":
            assert [len(b.branches) for b in r.blocks] == [len(x) for x in shape]
        assert_parity(model, tags, r, ATOL[engine.backend])


def test_parity_n_samples_and_budget_cut(setup):
    """Several samples per prompt, and a rollout cut by the budget inside a block (non-strict layout)."""
    model, tok, tags, engine = setup
    params = SamplingParams(n=3, seed=5, max_new_tokens=400, logits_processors=[Script(tok, [[9, 9, 9]])])
    for r in engine.generate(prompts(tok, 2), params):
        assert_parity(model, tags, r, ATOL[engine.backend])
    cut = SamplingParams(seed=5, max_new_tokens=60, logits_processors=[Script(tok, [[30, 30, 30]])])
    (r,) = engine.generate(prompts(tok, 1), cut)
    assert r.finish_reason == FinishReason.LENGTH and r.stats.total_tokens <= 60
    lay = build_layout(r.prompt_ids + r.token_ids, tags, len(r.prompt_ids), strict=False)
    assert lay.position_ids.tolist() == r.position_ids


def test_greedy_alone_equals_in_batch_of_8(setup):
    model, tok, tags, engine = setup
    shapes = [[[3, 5]], [[2]], [[1, 4, 2]], [[6, 1]], [[2, 2, 2]], [[3], [2, 5]], [[4, 1, 1, 1]], [[2, 3]]]
    ps = prompts(tok, len(shapes))
    proc = PerPrompt({tuple(p): Script(tok, s) for p, s in zip(ps, shapes, strict=True)})
    params = SamplingParams(temperature=0.0, max_new_tokens=300, logits_processors=[proc])
    batch = engine.generate(ps, params)
    alone = [engine.generate([p], params)[0] for p in ps]
    for a, b in zip(alone, batch, strict=True):
        assert a.token_ids == b.token_ids
        assert torch.allclose(
            torch.tensor(a.sampled_logprobs), torch.tensor(b.sampled_logprobs), atol=ATOL[engine.backend]
        )


def test_seeded_sampling_alone_equals_in_batch(setup):
    model, tok, tags, engine = setup
    ps = prompts(tok, 4)
    proc = PerPrompt({tuple(p): Script(tok, [[3, 2 + i]]) for i, p in enumerate(ps)})
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=200, logits_processors=[proc])
    batch = engine.generate(ps, params)
    for p, b in zip(ps, batch, strict=True):
        assert engine.generate([p], params)[0].token_ids == b.token_ids
