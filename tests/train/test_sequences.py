"""The trainer's log-probs (one padded batch) equal the engine's, both modes: parity from the trainer side."""

import torch

from npr.engine import ParallelEngine, SamplingParams
from npr.format import TagIds
from npr.model import tiny_model
from npr.train.sequences import encode_response, forward_logprobs, make_batch, rollout_example, sft_example
from tests.scripted import PerPrompt, Script


def test_batched_trainer_logprobs_match_engine():
    model, tok = tiny_model(seed=2)
    tags = TagIds.from_tokenizer(tok)
    engine = ParallelEngine(model, tok)
    prompts = [tok(f"problem {i} {'x ' * i}", add_special_tokens=False)["input_ids"] for i in range(3)]
    proc = PerPrompt(
        {tuple(p): Script(tok, s) for p, s in zip(prompts, [[[2, 4]], [[3, 1, 2]], [[5]]], strict=True)}
    )
    params = SamplingParams(seed=0, max_new_tokens=200, logits_processors=[proc])
    rollouts = engine.generate(prompts, params) + engine.generate(prompts[:1], params, mode="sequential")
    batch = make_batch([rollout_example(r) for r in rollouts], tags, tok.pad_token_id)
    with torch.no_grad():
        logp = forward_logprobs(model, batch)
    mask = batch.loss_mask.bool()
    assert mask.sum() == sum(sum(r.loss_mask) for r in rollouts)
    assert (logp[mask] - batch.old_logprobs[mask]).abs().max() < 1e-4


def test_sft_example_trains_every_response_token():
    model, tok = tiny_model()
    tags = TagIds.from_tokenizer(tok)
    text = " <guideline> <plan>1: add</plan></guideline>\n<step>1: 2 + 3 = 5 ok</step><takeaway>five it is</takeaway> \\boxed{5}"
    ids = encode_response(tok, text)
    assert ids[0] == tags.guideline_open and ids[-1] == tok.eos_token_id
    batch = make_batch([sft_example([5, 6, 7], ids)], tags, tok.pad_token_id)
    assert batch.num_tokens == len(ids)
    assert batch.loss_mask[0, :3].sum() == 0
