"""The vllm backend against the hf engine and the HF forward: tokens, log-probs, stops, cancel, bad input."""

from __future__ import annotations

import sys

import pytest
import torch

from npr.engine import (
    FinishReason,
    ParallelEngine,
    ParamError,
    SamplingParams,
    add_requests,
    load_engine,
    run_to_completion,
)
from npr.engine.sampling import repetition_penalty
from npr.engine.vllm import _step_penalty_class, load_vllm
from npr.format import TagIds
from npr.model import tiny_model
from tests.vllm.conftest import SMALL_CACHE, tiny_vllm_model

PROMPTS = [f"What is {a} + {b}?" for a, b in zip(range(8), range(3, 11), strict=True)]
GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return load_engine(tiny_folder, backend="vllm", **SMALL_CACHE)


@pytest.fixture(scope="module")
def hf():
    return ParallelEngine(*tiny_vllm_model())


def hf_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_greedy_tokens_equal_the_hf_engine_for_a_batch_of_8(engine, hf):
    ours = engine.generate(PROMPTS, GREEDY, "sequential")
    theirs = hf.generate(PROMPTS, GREEDY, "sequential")
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert (a.text, a.finish_reason, a.position_ids, a.loss_mask) == (
            b.text,
            b.finish_reason,
            b.position_ids,
            b.loss_mask,
        )
        assert a.stats.total_tokens == a.stats.critical_path_tokens == len(a.token_ids) == 16
        assert a.mode == "sequential" and not a.is_parallel
        torch.testing.assert_close(a.sampled_logprobs, b.sampled_logprobs, atol=1e-4, rtol=0)


def test_sampled_logprobs_match_the_hf_forward(engine, hf):
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_new_tokens=24)
    for r in engine.generate(PROMPTS[:3], params, "sequential"):
        expected = hf_logprobs(hf.model, r.prompt_ids + r.token_ids)[len(r.prompt_ids) - 1 :]
        torch.testing.assert_close(r.sampled_logprobs, expected, atol=1e-4, rtol=0)
        assert engine.score([r.prompt_ids + r.token_ids])[0][len(r.prompt_ids) - 1 :] == pytest.approx(
            expected, abs=1e-4
        )


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_new_tokens=12)
    alone = engine.generate(PROMPTS[:1], params, "sequential")
    batch = engine.generate([PROMPTS[5], PROMPTS[0]], params, "sequential")
    assert [r.token_ids for r in alone] == [r.token_ids for r in batch[3:]]
    assert [(r.index, r.sample) for r in batch] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(r.token_ids) for r in alone}) > 1  # seed + j: the samples differ


def test_a_stop_string_ends_the_sample_as_the_hf_engine_does(engine, hf):
    text = hf.generate(PROMPTS[:1], GREEDY, "sequential")[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_new_tokens=16, stop=[stop])
    [ours], [theirs] = (
        engine.generate(PROMPTS[:1], params, "sequential"),
        hf.generate(PROMPTS[:1], params, "sequential"),
    )
    assert ours.finish_reason == theirs.finish_reason == FinishReason.STOP
    assert (ours.stop_reason, ours.text, ours.token_ids) == (stop, theirs.text, theirs.token_ids)
    assert stop not in ours.text and len(ours.token_ids) < 16


def test_the_context_limit_ends_a_sample_with_length(engine):
    prompt = list(range(100, 100 + SMALL_CACHE["max_model_len"] - 5))
    [r] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=50), "sequential")
    assert (r.finish_reason, r.stop_reason, len(r.token_ids)) == (FinishReason.LENGTH, "context", 5)
    [r] = engine.generate([prompt[:10]], SamplingParams(temperature=0, max_new_tokens=3), "sequential")
    assert (r.finish_reason, r.stop_reason, len(r.token_ids)) == (FinishReason.LENGTH, None, 3)


def test_handles_drive_to_completion_and_cancel(engine):
    handles = add_requests(engine, PROMPTS[:3], SamplingParams(temperature=0, max_new_tokens=8), "sequential")
    engine.step()
    engine.cancel(handles[1])
    rollouts = run_to_completion(engine, [handles[0], handles[2]])
    assert [h.finish_reason for h in handles] == [
        FinishReason.LENGTH,
        FinishReason.CANCELLED,
        FinishReason.LENGTH,
    ]
    assert [len(r.token_ids) for r in rollouts] == [8, 8]
    assert handles[0].tokens_used == len(handles[0].response) == 8 and handles[0].blocks == ()
    assert not engine.has_work and engine.stats().running == 0
    handles = add_requests(engine, PROMPTS[:2], GREEDY, "sequential")
    engine.abort_all()
    assert all(h.finish_reason == FinishReason.CANCELLED for h in handles) and not engine.has_work


def test_what_vllm_cannot_do_is_refused_at_the_call(engine):
    for mode in ("parallel", None):  # None: the engine API's default mode, parallel
        with pytest.raises(ValueError, match="'hf' or 'llamacpp'"):
            engine.generate(PROMPTS[:1], GREEDY, *([mode] if mode else []))
    with pytest.raises(ParamError, match="logits_processors") as error:
        engine.add_request(PROMPTS[0], SamplingParams(logits_processors=[lambda ids, x: x]), "sequential")
    assert error.value.parameter == "logits_processors"
    with pytest.raises(ParamError, match="stop_on_violation"):
        engine.add_request(PROMPTS[0], SamplingParams(stop_on_violation=True), "sequential")
    assert not engine.has_work


def test_a_head_size_vllm_cannot_run_is_refused_at_load():
    model, tokenizer = tiny_model(seed=0)  # 4 heads of 16
    with pytest.raises(ValueError, match="head_dim 16.*backend 'hf' or 'llamacpp'"):
        load_vllm(model, tokenizer=tokenizer)


def test_a_missing_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match="make vllm"):
        load_engine("tiny", backend="vllm")


def test_the_step_penalty_applies_inside_the_open_step_only():
    from vllm import SamplingParams as VLLMParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    _, tokenizer = tiny_vllm_model()
    tags = TagIds.from_tokenizer(tokenizer)
    processor = _step_penalty_class()(None, torch.device("cpu"), False)
    on = VLLMParams(extra_args={"npr_step_penalty": (2.0, tags.step_open, tags.step_close)})
    inside, closed, plain = [5, tags.step_open, 7, 7], [tags.step_open, 8, tags.step_close, 9], [5, 6]
    added = [(0, on, [1], inside), (1, on, [1], closed), (2, VLLMParams(), [1], plain)]
    processor.update_state(BatchUpdate(3, [], added, []))
    logits = torch.randn(3, len(tokenizer))
    expected = logits.clone()
    repetition_penalty(expected, [[tags.step_open, 7], None, None], torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(processor.apply(logits.clone()), expected)

    inside.append(3)  # vLLM's live output list grows; then rows 0 and 2 swap places
    processor.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    expected = logits.clone()
    repetition_penalty(expected, [None, None, [tags.step_open, 7, 3]], torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(processor.apply(logits.clone()), expected)
