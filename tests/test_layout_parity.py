"""Issue 2's parity test: one forward with the layout equals decoding each branch separately from a shared
prefix cache, for a hand-built 2-block sequence (3 then 2 branches of unequal lengths); a causal mask fails."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from npr.engine.kv import cache_kwarg
from npr.format import TagIds
from npr.layout import build_layout
from npr.model import tiny_model

ATOL = 1e-4


def _forward(model, ids, positions, cache, past):
    """Run `ids` at `positions` after `past` cached tokens, seeing all of them (explicit 4D mask)."""
    q = len(ids)
    mask = torch.zeros(1, 1, q, past + q)
    mask[0, 0, :, past:] = torch.zeros(q, q).masked_fill(
        torch.ones(q, q, dtype=torch.bool).triu(1), -torch.inf
    )
    mask = mask.clamp(min=torch.finfo(torch.float32).min)
    out = model(
        input_ids=torch.tensor([ids]),
        position_ids=torch.tensor([positions]),
        attention_mask=mask,
        use_cache=True,
        **{cache_kwarg(model): cache},
    )
    return out.logits[0]


def _concat(prefix: DynamicCache, branches: list[DynamicCache], prefix_len: int) -> DynamicCache:
    """Prefix cache followed by every branch's own part, layer by layer."""
    merged = DynamicCache()
    for i, layer in enumerate(prefix.layers):
        keys = torch.cat([layer.keys] + [b.layers[i].keys[:, :, prefix_len:] for b in branches], dim=2)
        values = torch.cat([layer.values] + [b.layers[i].values[:, :, prefix_len:] for b in branches], dim=2)
        merged.update(keys, values, i)
    return merged


@pytest.fixture(scope="module")
def case():
    model, tok = tiny_model(seed=1)
    tags = TagIds.from_tokenizer(tok)

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def guideline(n):
        ids = [tags.guideline_open]
        for i in range(1, n + 1):
            ids += [tags.plan_open, *enc(f"{i}: part"), tags.plan_close]
        return [*ids, tags.guideline_close]

    def step(i, text):
        return [tags.step_open, *enc(f"{i}: {text}"), tags.step_close]

    prompt = enc("add the numbers 3 4 5 and 6")
    trunk1 = enc("ok") + guideline(3)
    branches1 = [step(1, "3 plus 4 is 7"), step(2, "5"), step(3, "6 and more words here")]
    mid = [tags.takeaway_open, *enc("sum 18"), tags.takeaway_close, *guideline(2)]
    branches2 = [step(1, "check it twice now"), step(2, "fine")]
    tail = [tags.takeaway_open, *enc("done"), tags.takeaway_close, *enc("\\boxed{18}")]
    segments = [("trunk", prompt + trunk1), *[("b", b) for b in branches1], ("trunk", mid)]
    segments += [*[("b", b) for b in branches2], ("trunk", tail)]
    return model, tags, prompt, segments


def _reference(model, segments):
    """Decode trunk plainly; each branch from a copy of the prefix cache at positions g+1…; merge caches."""
    logits: list[torch.Tensor] = []
    cache, past, pos = DynamicCache(), 0, 0
    pending: list[list[int]] = []

    def flush():
        nonlocal cache, past
        if not pending:
            return 0
        caches, longest = [], 0
        for b in pending:
            c = copy.deepcopy(cache)
            logits.append(_forward(model, b, list(range(pos, pos + len(b))), c, past))
            caches.append(c)
            longest = max(longest, len(b))
        cache = _concat(cache, caches, past)
        past += sum(len(b) for b in pending)
        pending.clear()
        return longest

    for kind, ids in segments:
        if kind == "b":
            pending.append(ids)
            continue
        pos += flush()
        logits.append(_forward(model, ids, list(range(pos, pos + len(ids))), cache, past))
        past, pos = past + len(ids), pos + len(ids)
    return torch.cat(logits)  # [L, V] in canonical order


def test_layout_forward_equals_separate_branch_decoding(case):
    model, tags, prompt, segments = case
    ids = [t for _, s in segments for t in s]
    lay = build_layout(ids, tags, len(prompt))
    with torch.no_grad():
        got = model(
            input_ids=lay.token_ids[None],
            position_ids=lay.position_ids[None],
            attention_mask=lay.attention_mask(),
        )
        ref = _reference(model, segments)
    assert (got.logits[0] - ref).abs().max().item() < ATOL


def test_branch_equals_plain_forward_over_prefix_and_that_branch_alone(case):
    model, tags, prompt, segments = case
    ids = [t for _, s in segments for t in s]
    lay = build_layout(ids, tags, len(prompt))
    with torch.no_grad():
        full = model(
            input_ids=lay.token_ids[None],
            position_ids=lay.position_ids[None],
            attention_mask=lay.attention_mask(),
        ).logits[0]
        prefix = segments[0][1]
        start = len(prefix)
        for _, branch in segments[1:4]:
            alone = model(input_ids=torch.tensor([prefix + branch])).logits[0, len(prefix) :]
            assert (full[start : start + len(branch)] - alone).abs().max().item() < ATOL
            start += len(branch)


def test_causal_mask_fails_parity(case):
    """Negative control: the same positions with a plain causal mask let siblings see each other."""
    model, tags, prompt, segments = case
    ids = [t for _, s in segments for t in s]
    lay = build_layout(ids, tags, len(prompt))
    with torch.no_grad():
        causal = build_layout(ids, tags, len(prompt), parallel=False).attention_mask()
        got = model(
            input_ids=lay.token_ids[None], position_ids=lay.position_ids[None], attention_mask=causal
        ).logits[0]
        ref = _reference(model, segments)
    assert (got - ref).abs().max().item() > 1e-2
