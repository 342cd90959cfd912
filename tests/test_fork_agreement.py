"""The engine's fork trigger and the format checker agree (DESIGN §3): a guideline forks exactly when `parse`
accepts it. Found on the paper's own text: a plan without `ID:` used to fork while `check` rejected it."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.engine import FinishReason, ParallelEngine, Rollout, SamplingParams
from npr.format import MAX_PLANS, QUALITY_CODES, EventKind, FormatError, StreamParser, TagIds, check, parse
from npr.model import tiny_model


@cache
def _setup() -> tuple[ParallelEngine, object, TagIds]:
    model, tok = tiny_model(seed=0)
    return ParallelEngine(model, tok), tok, TagIds.from_tokenizer(tok)


def forced(prompt_len: int, ids: list[int], eos: int) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """A logits processor that writes `ids` (in canonical order), then ends the answer."""

    def process(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        i = len(visible) - prompt_len
        out = torch.full_like(logits, float("-inf"))
        out[ids[i] if i < len(ids) else eos] = 0.0
        return out

    return process


def decode(ident: str, **params: object) -> Rollout:
    """One parallel answer with a single plan whose text starts with `ident` (e.g. "1: " or nothing)."""
    engine, tok, _ = _setup()
    text = (
        f"<guideline><plan>{ident}add 2 and 3</plan></guideline><step>{ident}2 + 3 = 5</step>"
        "<takeaway>The sum is 5.</takeaway>So \\boxed{5}"
    )
    prompt = tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    processor = forced(len(prompt), ids, tok.eos_token_id)
    sampling = SamplingParams(max_new_tokens=200, logits_processors=[processor], **params)  # type: ignore[arg-type]
    (rollout,) = engine.generate([prompt], sampling, mode="parallel")
    return rollout


def test_plan_with_id_forks() -> None:
    r = decode("1: ")
    assert r.finish_reason == FinishReason.STOP and r.stats.forks == 1
    assert parse(r.text).answer == "5"


def test_plan_without_id_does_not_fork() -> None:
    r = decode("")
    assert r.stats.forks == 0 and r.blocks == []
    assert r.finish_reason in (FinishReason.INVALID_FORK, FinishReason.INVALID_STRUCTURE)
    assert (r.stop_reason or "").startswith("missing_id")


def test_plans_that_share_an_id_do_not_fork() -> None:
    engine, tok, _ = _setup()
    text = (
        "<guideline><plan>1: add them</plan><plan>1: count up</plan></guideline>"
        "<step>1: 2 + 3 = 5</step><step>1: 3, 4, 5</step><takeaway>Both give 5.</takeaway>\\boxed{5}"
    )
    assert "duplicate_id" in {i.code for i in check(text).issues}
    prompt = tok("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    processor = forced(len(prompt), tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id)
    (r,) = engine.generate([prompt], SamplingParams(max_new_tokens=200, logits_processors=[processor]))
    assert r.stats.forks == 0 and r.finish_reason == FinishReason.INVALID_FORK
    assert (r.stop_reason or "").startswith("duplicate_id")


def test_plan_without_id_decodes_on_sequentially_when_violations_do_not_stop() -> None:
    r = decode("", stop_on_violation=False)
    assert r.finish_reason == FinishReason.STOP and r.stats.forks == 0
    assert r.position_ids == list(range(len(r.position_ids)))  # no branch ever restarted a position
    assert "missing_id" in {i.code for i in check(r.text).issues}


# ---- property: fork decision == check/parse verdict, over generated guidelines ---------------------------

SEPARATORS = st.sampled_from(["", "", "\n", " \n "])
PLAN_TEXTS = st.sampled_from(["add the numbers", "estimate first", "ab", "Step one: go"])


@st.composite
def responses(draw: st.DrawFn) -> str:
    """A response whose guideline varies (plan count, IDs present or not, stray text, whitespace), followed
    by steps that carry the plans' IDs, a takeaway and a boxed answer."""
    n = draw(st.integers(0, MAX_PLANS + 1))
    ids = [
        draw(st.sampled_from([f"{i + 1}", f"{i + 1}.1", f"{i + 1}", "", "1"])) for i in range(n)
    ]  # "1": repeats
    sep = draw(SEPARATORS)
    items = [f"<plan>{draw(SEPARATORS)}{i + ': ' if i else ''}{draw(PLAN_TEXTS)}</plan>" for i in ids]
    items.insert(draw(st.integers(0, n)), draw(st.sampled_from(["", "", "a note"])))
    steps = "".join(f"<step>{i + ': ' if i else ''}work it out fully</step>" for i in ids)
    return f"<guideline>{sep}{sep.join(items)}{sep}</guideline>{sep}{steps}<takeaway>compare them</takeaway>\\boxed{{5}}"


def forks_on_tokens(text: str) -> bool:
    """The engine's view: token by token, tag-ness from the token id."""
    _, tok, tags = _setup()
    parser = StreamParser()
    events = [
        e
        for t in tok(text, add_special_tokens=False)["input_ids"]
        for e in parser.feed_token(tok.decode([t]), tags.tag_of(t))
    ]
    return any(e.kind == EventKind.GUIDELINE_CLOSED for e in events)


def forks_on_chunks(text: str, seed: int) -> bool:
    """The text view (sequential mode): arbitrary chunks, tags possibly split across them."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(8, len(text) - 1)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return any(e.kind == EventKind.GUIDELINE_CLOSED for e in StreamParser().feed_all(chunks))


def parses(text: str) -> bool:
    try:
        parse(text)
    except FormatError:
        return False
    return True


@settings(max_examples=150, deadline=None)
@given(responses(), st.integers(0, 2**16))
def test_fork_decision_agrees_with_check(text: str, seed: int) -> None:
    grammatical = not [i for i in check(text).issues if i.code not in QUALITY_CODES]
    assert grammatical == parses(text)
    assert forks_on_tokens(text) == grammatical
    assert forks_on_chunks(text, seed) == grammatical
