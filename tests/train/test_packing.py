"""Packing: rows within their token budget, and packed steps that compute the loss and gradients of unpacked ones
(parallel SFT and the PAPO update, float32 on CPU, to 1e-5)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npr.format import TagIds
from npr.model import tiny_model
from npr.train.losses import papo_loss, sft_loss
from npr.train.packing import local_rows, pack, padding_share, plan_micro_batches
from npr.train.sequences import TrainExample, forward_logprobs, layout_forward, make_batch
from npr.train.sft import load_sft_examples
from tests.strategies import FAST
from tests.train.test_sft import SUMS, write_data


@FAST
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(40, 100))
def test_rows_hold_every_sequence_once_within_the_budget(lengths: list[int], capacity: int) -> None:
    rows = pack(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # first fit: no two rows could have been one
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_pack_refuses_a_sequence_over_the_budget() -> None:
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than max_tokens_per_row 8"):
        pack([3, 9], 8)


def test_padding_share_before_and_after_packing() -> None:
    lengths = [10, 2, 2, 6]
    unpacked = plan_micro_batches(lengths, packing=False, capacity=10, rows_per_batch=1, batch_size=4)
    packed = plan_micro_batches(lengths, packing=True, capacity=10, rows_per_batch=2, batch_size=4)
    assert unpacked == [[[0], [1], [2], [3]]] and packed == [[[0], [1, 2, 3]]]
    assert padding_share(unpacked, lengths) == pytest.approx(1 - 20 / 40)
    assert padding_share(packed, lengths) == 0.0


@functools.cache
def _setup(tmp: str) -> tuple[list[TrainExample], TagIds, int]:
    from pathlib import Path

    _, tokenizer = tiny_model()
    examples, _ = load_sft_examples(
        write_data(Path(tmp) / "d.jsonl", SUMS[:5]), tokenizer, parallel=True, max_len=4096
    )
    return examples, TagIds.from_tokenizer(tokenizer), tokenizer.pad_token_id


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _packed_rows(examples: list[TrainExample]) -> list[list[list[int]]]:
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    passes = plan_micro_batches(
        lengths, packing=True, capacity=2 * max(lengths), rows_per_batch=2, batch_size=1
    )
    assert any(len(row) > 1 for batch in passes for row in batch)  # something really shares a row
    return passes


def test_packed_sft_step_equals_unpacked(tmp_path) -> None:
    examples, tags, pad = _setup(str(tmp_path))
    model, _ = tiny_model()
    tokens = sum(len(e.response_ids) for e in examples)
    batch = make_batch(examples, tags, pad)
    unpacked = sft_loss(layout_forward(model, batch), batch.layout.input_ids, batch.loss_mask)
    unpacked.backward()
    want = _grads(model)
    packed = torch.zeros(())
    for micro in _packed_rows(examples):
        flat, rows = local_rows(micro)
        part = make_batch([examples[i] for i in flat], tags, pad, rows=rows)
        loss = sft_loss(layout_forward(model, part), part.layout.input_ids, part.loss_mask, num_tokens=tokens)
        loss.backward()
        packed = packed + loss.detach()
    assert abs(packed.item() - unpacked.item()) < 1e-5
    _assert_close(_grads(model), want)


def test_packed_papo_update_equals_unpacked(tmp_path) -> None:
    """Rollout-like examples: only some response tokens trained, one advantage per sequence."""
    examples, tags, pad = _setup(str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    rollouts = [
        TrainExample(
            e.prompt_ids,
            e.response_ids,
            torch.randint(0, 2, (len(e.response_ids),), generator=generator).tolist(),
        )
        for e in examples
    ]
    advantages = torch.randn(len(rollouts), generator=generator)
    tokens = sum(sum(e.loss_mask) for e in rollouts)
    model, _ = tiny_model()
    batch = make_batch(rollouts, tags, pad)
    unpacked = papo_loss(forward_logprobs(model, batch), advantages, batch.loss_mask)
    unpacked.backward()
    want = _grads(model)
    packed = torch.zeros(())
    for micro in _packed_rows(rollouts):
        flat, rows = local_rows(micro)
        part = make_batch([rollouts[i] for i in flat], tags, pad, rows=rows)
        adv = part.per_token(advantages[flat])  # [rows, L]
        loss = papo_loss(forward_logprobs(model, part), adv, part.loss_mask, num_tokens=tokens)
        loss.backward()
        packed = packed + loss.detach()
    assert abs(packed.item() - unpacked.item()) < 1e-5
    _assert_close(_grads(model), want)
