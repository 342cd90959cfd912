"""Engine behaviour beyond log-prob parity: fuzzed structure, budgets, invalid structure, sampling, API edges.

A random model never writes tags by itself, so logits processors script what each request does; they see
the prompt in `visible`, which lets one batch mix behaviours (`PerPrompt`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from npr.engine import (
    FinishReason,
    ParamError,
    Rollout,
    SamplingParams,
    load_rollouts,
    save_rollouts,
)
from npr.engine.params import LogitsProcessor
from npr.format import TagIds
from npr.layout import LayoutError, build_layout
from npr.model import tiny_model
from tests.conftest import BACKENDS, assert_no_leak, make_engine
from tests.scripted import PerPrompt, Script

INVALID = {FinishReason.INVALID_FORK, FinishReason.INVALID_STRUCTURE}


@pytest.fixture(scope="module")
def tiny():
    # One intra-op thread: the tiny model's ops are microseconds, and on a shared 2-core box a second
    # thread only adds contention (7x slower measured under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_model(seed=0)
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS)
def setup(request, tiny):
    """A fresh engine per test and backend, so a test that leaves requests behind cannot leak into the next;
    on llama.cpp, an idle engine must hold no sequence and no cell afterwards."""
    model, tok = tiny
    gguf = request.getfixturevalue("tiny_gguf") if request.param == "llamacpp" else None
    engine = make_engine(request.param, model, tok, gguf)
    yield model, tok, TagIds.from_tokenizer(tok), engine
    assert_no_leak(engine)


def prompts(tok, n: int, stem: str = "question") -> list[list[int]]:
    """n distinct prompts of varied length."""
    return [tok(f"{stem} {i}:" + " why" * (i % 5), add_special_tokens=False)["input_ids"] for i in range(n)]


def enc(tok, text: str) -> list[int]:
    """Token ids of text with tag strings kept as plain sub-tokens."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def force(logits: torch.Tensor, token: int) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    out[token] = 0.0
    return out


@dataclass
class Forced:
    """Forces `ids` as the response, by response index, then end-of-sequence."""

    prompt_len: int
    ids: list[int]
    eos: int

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        i = len(visible) - self.prompt_len
        return force(logits, self.ids[i] if i < len(self.ids) else self.eos)


@dataclass
class SaysFirst(Script):
    """A Script whose first free tokens (in its first branch, when it forks) are `words`."""

    words: list[int] = field(default_factory=list)

    def _free(self, logits: torch.Tensor) -> torch.Tensor:
        return self._force(logits, self.words.pop(0)) if self.words else super()._free(logits)


@dataclass
class FreeTrunk:
    """`k` free trunk tokens (tags and eos banned) before `script` takes over."""

    script: Script
    prompt_len: int
    k: int

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(visible) - self.prompt_len < self.k:
            return self.script._free(logits)
        return self.script(visible, logits)


@dataclass
class Spy:
    """Records the ids each call sees and the logits it returns."""

    inner: LogitsProcessor
    calls: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = self.inner(visible, logits)
        self.calls.append((list(visible), out))
        return out


def layout(r: Rollout, tags: TagIds, strict: bool = True):
    return build_layout(
        r.prompt_ids + r.token_ids, tags, len(r.prompt_ids), parallel=r.mode == "parallel", strict=strict
    )


# ---------------------------------------------------------------------------------------------------- fuzz


class Fuzzer:
    """Forces random tokens whose odds depend on the last tag seen: mostly the grammar's next move, sometimes
    any tag, end-of-sequence, digits or text, so that many requests fork and many break the grammar."""

    def __init__(self, tok, tags: TagIds, seed: int):
        self.rng = random.Random(seed)
        self.tag_ids = tags.as_tuple()
        self.pools = {
            "tag": list(self.tag_ids),
            "eos": [tok.eos_token_id],
            "digit": enc(tok, "0123456789"),
            "text": enc(tok, " the cat sat on a mat < > / = + :"),
        }
        t = tags
        self.tok, self.plan_open, self.open = tok, t.plan_open, t.guideline_open
        outside = {t.guideline_open: 6, "text": 2, "digit": 1, "eos": 1, "tag": 0.5}
        self.odds: dict[int | None, dict] = {
            None: outside,
            t.takeaway_close: {**outside, t.guideline_open: 3, "eos": 3},
            t.guideline_open: {t.plan_open: 8, t.guideline_close: 0.5, "text": 0.5, "tag": 0.5},
            t.plan_open: {"digit": 3, "text": 4, t.plan_close: 3, "tag": 0.3, "eos": 0.2},
            t.plan_close: {t.plan_open: 3, t.guideline_close: 4, "text": 0.3, "tag": 0.5},
            t.guideline_close: {t.step_open: 8, t.takeaway_open: 1, "tag": 0.5},
            t.step_open: {"text": 6, "digit": 2, t.step_close: 3, "tag": 0.3, "eos": 0.2},
            t.step_close: {t.step_open: 4, t.takeaway_open: 4, "text": 0.3, "tag": 0.5},
            t.takeaway_open: {"text": 5, t.takeaway_close: 3, "tag": 0.3, "eos": 0.2},
        }

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        last = next((x for x in reversed(visible) if x in self.tag_ids), None)
        if last == self.plan_open and self.rng.random() < 0.9:  # mostly a plan that can fork: "ID:" first
            start = max(i for i, x in enumerate(visible) if x == last)
            opened = max((i for i, x in enumerate(visible) if x == self.open), default=0)
            plan = sum(x == last for x in visible[opened:])
            ident = enc(self.tok, f"{plan}:")
            if len(visible) - 1 - start < len(ident):
                return force(logits, ident[len(visible) - 1 - start])
        odds = self.odds[last]
        pick = self.rng.choices(list(odds), list(odds.values()))[0]
        token = self.rng.choice(self.pools[pick]) if isinstance(pick, str) else pick
        return force(logits, token)


def offender(r: Rollout, tags: TagIds, eos: int) -> int:
    """Response index of the token that broke the grammar: the last one in the trunk, or the last token of
    the one cut branch that ends in a tag or end-of-sequence."""
    if r.blocks and r.blocks[-1].takeaway_position is None:
        ends = [b.start + b.length - 1 for b in r.blocks[-1].branches if not b.finished]
        bad = [i for i in ends if r.token_ids[i] in (*tags.as_tuple(), eos)]
        if bad:
            assert len(bad) == 1, bad
            return bad[0]
    return len(r.token_ids) - 1


def check_fuzzed(r: Rollout, params: SamplingParams, tags: TagIds, eos: int) -> None:
    n_resp = len(r.token_ids)
    assert n_resp == len(r.sampled_logprobs) == len(r.loss_mask) == len(r.position_ids) - len(r.prompt_ids)
    assert r.stats.total_tokens == n_resp <= params.max_new_tokens
    assert r.stats.forks == len(r.blocks) and r.stats.branches == sum(len(b.branches) for b in r.blocks)
    assert all(lp == 0.0 for lp, m in zip(r.sampled_logprobs, r.loss_mask, strict=True) if m == 0)
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in r.sampled_logprobs)
    if r.mode == "sequential":
        assert r.position_ids == list(range(len(r.position_ids))) and r.stats.forks == 0
        return
    if r.finish_reason == FinishReason.STOP:
        assert layout(r, tags).position_ids.tolist() == r.position_ids
        return
    ids, positions = r.token_ids, r.position_ids
    if r.finish_reason in INVALID:  # the response keeps the offending token; all before it must lay out
        cut = offender(r, tags, eos)
        ids, positions = (
            ids[:cut] + ids[cut + 1 :],
            positions[: len(r.prompt_ids) + cut] + positions[len(r.prompt_ids) + cut + 1 :],
        )
    lay = build_layout(r.prompt_ids + ids, tags, len(r.prompt_ids), strict=False)
    assert lay.position_ids.tolist() == positions


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_fuzzed_structure_never_breaks_the_engine(setup, mode):
    model, tok, tags, engine = setup
    reasons: Counter[str] = Counter()
    broken: Counter[str] = Counter()
    forked = 0
    for batch, (max_new, max_plans, reserve) in enumerate(
        [(24, 2, 1), (32, 3, 2), (40, 5, 4), (48, 4, 1), (28, 5, 2), (44, 3, 3)]
    ):
        params = SamplingParams(
            seed=batch,
            max_new_tokens=max_new,
            max_plans=max_plans,
            fork_reserve=reserve,
            logits_processors=[Fuzzer(tok, tags, seed=batch)],
        )
        for r in engine.generate(prompts(tok, 50, stem=f"fuzz {batch}"), params, mode=mode):
            reasons[r.finish_reason.value] += 1
            forked += r.is_parallel
            try:
                check_fuzzed(r, params, tags, tok.eos_token_id)
            except (AssertionError, LayoutError) as e:
                broken[f"{r.finish_reason.value}: {e}".splitlines()[0][:100]] += 1
    print(f"\nfuzz {mode}: {dict(reasons)}, forked {forked}/300")
    assert not broken, f"rollouts that break the contract: {dict(broken)}"
    assert not engine.has_work and sum(reasons.values()) == 300
    if mode == "parallel":
        assert forked >= 60
        assert {"stop", "length", "budget", "invalid_fork", "invalid_structure"} <= set(reasons)
    else:
        assert set(reasons) <= {"stop", "length"}


# -------------------------------------------------------------------------------------------------- budget


def guideline_len(r: Rollout) -> int:
    """Response tokens up to and including the first </guideline>."""
    return r.blocks[0].guideline_position - len(r.prompt_ids) + 1


def test_fork_that_cannot_fit_its_reserve_ends_with_budget(setup):
    model, tok, tags, engine = setup
    script = Script(tok, [[5, 5, 5]])
    (p,) = prompts(tok, 1)
    (full,) = engine.generate([p], SamplingParams(seed=0, max_new_tokens=400, logits_processors=[script]))
    g = guideline_len(full)
    forced = [1 + len(tok.encode(f"{i}:", add_special_tokens=False)) for i in (1, 2, 3)]  # <step> + "i:"
    # Room for the forced prefixes but not for fork_reserve tokens per branch plus the takeaway: refused.
    tight = SamplingParams(
        seed=0, max_new_tokens=g + sum(forced) + 2, fork_reserve=4, logits_processors=[script]
    )
    (r,) = engine.generate([p], tight)
    assert r.finish_reason == FinishReason.BUDGET and "fork of 3" in (r.stop_reason or "")
    assert r.stats.forks == 0 and r.token_ids == full.token_ids[:g]
    # Exactly the reserve: the fork goes ahead, and the ledger then cuts the branches.
    exact = SamplingParams(
        seed=0, max_new_tokens=g + sum(forced) + 3 * 4 + 1, fork_reserve=4, logits_processors=[script]
    )
    (r,) = engine.generate([p], exact)
    assert r.stats.forks == 1 and r.finish_reason == FinishReason.LENGTH
    assert r.stats.total_tokens <= exact.max_new_tokens


def test_max_new_tokens_counts_every_branch(setup):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    spent = {}
    for width in (1, 3):
        params = SamplingParams(seed=0, max_new_tokens=70, logits_processors=[Script(tok, [[60] * width])])
        (r,) = engine.generate([p], params)
        assert r.finish_reason == FinishReason.LENGTH and r.stats.total_tokens <= 70
        assert r.stats.critical_path_tokens == max(r.position_ids) - len(p) + 1
        g = guideline_len(r)
        spent[width] = (r.stats.total_tokens - g, r.stats.critical_path_tokens - g)  # (all branches, depth)
    assert spent[1][0] == spent[1][1]
    total, depth = spent[3]
    assert 3 * depth - 3 <= total <= 3 * depth  # three branches advance together: 3 tokens per position
    assert depth * 2 < spent[1][1]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_max_path_tokens_bounds_the_critical_path(setup, mode):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    script = Script(tok, [[30, 30]])
    (full,) = engine.generate([p], SamplingParams(seed=0, max_new_tokens=400, logits_processors=[script]))
    limit = guideline_len(full) + 12
    params = SamplingParams(seed=0, max_new_tokens=400, max_path_tokens=limit, logits_processors=[script])
    (r,) = engine.generate([p], params, mode=mode)
    assert r.finish_reason == FinishReason.LENGTH
    assert r.stats.critical_path_tokens <= limit
    assert (r.stats.total_tokens > limit) == (mode == "parallel")  # two branches spend beyond the path
    refused = SamplingParams(
        seed=0, max_new_tokens=400, max_path_tokens=guideline_len(full) + 3, logits_processors=[script]
    )
    (r,) = engine.generate([p], refused)
    assert r.finish_reason == FinishReason.BUDGET


# ----------------------------------------------------------------------------------------- invalid structure


def test_invalid_structure_ends_only_that_request(setup):
    model, tok, tags, engine = setup
    t, eos = tags, tok.eos_token_id
    ps = prompts(tok, 8, stem="invalid")

    def trunk(p, ids):
        return Forced(len(p), ids, eos)

    plan = [t.plan_open, *enc(tok, "1: a"), t.plan_close]
    cases = [
        (trunk(ps[0], [t.guideline_open, t.guideline_close]), FinishReason.INVALID_FORK, "no_plan"),
        (
            trunk(ps[1], [t.guideline_open, *plan * 3, t.guideline_close]),
            FinishReason.INVALID_FORK,
            "too_many_plans",
        ),
        (trunk(ps[2], [*enc(tok, " a"), t.step_close]), FinishReason.INVALID_STRUCTURE, "unexpected_tag"),
        (
            trunk(ps[3], [t.guideline_open, *plan, t.guideline_open]),
            FinishReason.INVALID_STRUCTURE,
            "nested_tag",
        ),
        (SaysFirst(tok, [[3]], words=[t.step_open]), FinishReason.INVALID_STRUCTURE, "nested_tag"),
        (
            SaysFirst(tok, [[3]], words=[eos]),
            FinishReason.INVALID_STRUCTURE,
            "end of sequence inside a step",
        ),
        (Script(tok, [[2, 4]]), FinishReason.STOP, None),
        (Script(tok, [[3], [1, 2]]), FinishReason.STOP, None),
    ]
    proc = PerPrompt({tuple(p): c[0] for p, c in zip(ps, cases, strict=True)})
    rollouts = engine.generate(
        ps, SamplingParams(seed=0, max_new_tokens=200, max_plans=2, logits_processors=[proc])
    )
    for r, (_, reason, detail) in zip(rollouts, cases, strict=True):
        assert r.finish_reason == reason, (r.stop_reason, r.text)
        assert detail is None or (r.stop_reason or "").startswith(detail)
    assert [r.stats.forks for r in rollouts[6:]] == [1, 2]
    for r in rollouts[6:]:
        assert layout(r, tags).position_ids.tolist() == r.position_ids


def test_sequential_mode_reads_on_through_violations_unless_told(setup):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    params = SamplingParams(
        max_new_tokens=20,
        logits_processors=[
            Forced(len(p), [*enc(tok, " a"), tags.step_close, *enc(tok, " b")], tok.eos_token_id)
        ],
    )
    (r,) = engine.generate([p], params, mode="sequential")
    assert r.finish_reason == FinishReason.STOP and r.text.endswith(" b")
    params.stop_on_violation = True
    (r,) = engine.generate([p], params, mode="sequential")
    assert r.finish_reason == FinishReason.INVALID_STRUCTURE and r.token_ids[-1] == tags.step_close


@pytest.mark.parametrize("where", ["trunk", "branch"])
def test_tags_spelled_as_plain_text_do_not_steer_the_engine(setup, where):
    """Only tag ids fork and close branches: the layout is a function of ids (DESIGN §3), so a tag spelled in
    sub-tokens must not move positions away from it."""
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    proc: LogitsProcessor
    if where == "trunk":
        proc = Forced(len(p), enc(tok, "<guideline><plan>1: add</plan></guideline> so"), tok.eos_token_id)
    else:
        spelled = enc(tok, " x</step>")
        proc = SaysFirst(tok, [[len(spelled) + 3]], words=spelled)
    (r,) = engine.generate([p], SamplingParams(seed=0, max_new_tokens=120, logits_processors=[proc]))
    assert r.finish_reason == FinishReason.STOP, r.stop_reason
    assert layout(r, tags).position_ids.tolist() == r.position_ids, r.text
    assert r.stats.forks == (0 if where == "trunk" else 1)


# -------------------------------------------------------------------------------------------------- sampling

SAMPLED = dict(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=120)


def test_same_seed_same_tokens_alone_and_in_a_mixed_batch(setup):
    model, tok, tags, engine = setup
    ps = prompts(tok, 5, stem="mixed")
    target = SamplingParams(seed=123, logits_processors=[Script(tok, [[9, 6]], takeaway_len=5)], **SAMPLED)
    (alone,) = engine.generate([ps[0]], target)
    others = [
        (SamplingParams(seed=9, n=2, logits_processors=[Script(tok, [[2, 3, 4]])], **SAMPLED), "parallel"),
        (SamplingParams(seed=5, temperature=0.0, logits_processors=[Script(tok, [[5], [2, 2]])]), "parallel"),
        (SamplingParams(seed=9, logits_processors=[Script(tok, [[4, 4]])], **SAMPLED), "sequential"),
    ]
    engine.add_request(ps[1], *others[0], index=1)
    engine.add_request(ps[2], *others[1], index=2)
    (mixed,) = engine.add_request(ps[0], target, index=0)
    engine.add_request(ps[3], *others[2], index=3)
    while engine.has_work:
        engine.step()
    batched = engine.rollout(mixed)
    assert batched.token_ids == alone.token_ids and alone.finish_reason == FinishReason.STOP
    assert torch.allclose(
        torch.tensor(batched.sampled_logprobs), torch.tensor(alone.sampled_logprobs), atol=1e-4
    )
    (other_seed,) = engine.generate(
        [ps[0]], SamplingParams(seed=124, logits_processors=target.logits_processors, **SAMPLED)
    )
    assert other_seed.token_ids != alone.token_ids


def test_greedy_takes_the_argmax_of_the_processed_logits(setup):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    bias = torch.randn(len(tok), generator=torch.Generator().manual_seed(0)) * 3
    banned = [*tags.as_tuple(), tok.eos_token_id]

    def tilt(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits + bias
        logits[banned] = float("-inf")
        return logits

    spy = Spy(tilt)
    (r,) = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=20, logits_processors=[spy]))
    assert len(spy.calls) == len(r.token_ids) == 20
    for (_, out), token in zip(spy.calls, r.token_ids, strict=True):
        assert token == int(out.argmax())


def test_stop_strings_end_the_request_and_cut_the_text(setup):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    ids = enc(tok, " the cat sat on the mat and more")
    params = SamplingParams(
        max_new_tokens=40, stop=("zebra", "sat on"), logits_processors=[Forced(len(p), ids, tok.eos_token_id)]
    )
    for mode in ("parallel", "sequential"):
        (r,) = engine.generate([p], params, mode=mode)
        assert r.finish_reason == FinishReason.STOP and r.stop_reason == "sat on"
        assert r.text == " the cat "
        assert "sat on" in tok.decode(r.token_ids) and "sat on" not in tok.decode(r.token_ids[:-1])


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_branch_repetition_penalty_acts_only_inside_steps(setup, mode):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    free = 12
    proc = FreeTrunk(Script(tok, [[24, 24]]), len(p), free)
    out = {}
    for penalty in (1.0, 5.0):
        params = SamplingParams(
            seed=4,
            temperature=1.0,
            top_k=3,
            max_new_tokens=200,
            branch_repetition_penalty=penalty,
            logits_processors=[proc],
        )
        (r,) = engine.generate([p], params, mode=mode)
        assert r.finish_reason == FinishReason.STOP
        out[penalty] = r.token_ids
    a, b = out[1.0], out[5.0]
    assert a[free] == tags.guideline_open  # `free` sampled trunk tokens, then the scripted block
    first = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert first > a.index(tags.step_open) > free
    last_tag = next(x for x in reversed(a[:first]) if x in tags.as_tuple())
    assert last_tag == tags.step_open  # the first token the penalty changed is inside a step


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_processors_see_exactly_what_the_row_attends_to(setup, mode):
    """Each call's ids are the prompt plus what the sampled token's row attends to (the layout's visibility),
    in canonical order: never a sibling branch's token."""
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)
    lens = [[3, 5, 4], [2, 6]]
    spy = Spy(Script(tok, lens))
    (r,) = engine.generate(
        [p], SamplingParams(seed=1, max_new_tokens=300, logits_processors=[spy]), mode=mode
    )
    assert r.finish_reason == FinishReason.STOP
    ids = r.prompt_ids + r.token_ids
    visible = layout(r, tags).visible()
    sampled = [len(p) + i for i, m in enumerate(r.loss_mask) if m]
    expected = sorted([ids[k] for k in range(j) if visible[j - 1, k]] for j in sampled)
    seen = [v for v, _ in spy.calls]
    assert all(v[: len(p)] == p for v in seen)
    assert sorted(seen) == expected
    if mode == "parallel":
        tails = [v[len(v) - v[::-1].index(tags.guideline_close) :] for v in seen if tags.guideline_close in v]
        in_branch = [x for x in tails if tags.takeaway_open not in x]
        assert len(in_branch) == sum(map(sum, lens)) + sum(map(len, lens))  # free tokens + </step> per branch
        assert all(x.count(tags.step_open) == 1 for x in in_branch)


# ------------------------------------------------------------------------------------------------- API edges


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("max_path_tokens", 0),
        ("max_plans", 0),
        ("branch_repetition_penalty", 0.0),
        ("fork_reserve", 0),
        ("stop", ("ok", "")),
    ],
)
def test_bad_sampling_params_name_the_parameter(name, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{name: value})
    assert err.value.parameter == name and err.value.value == value
    assert str(err.value).startswith(name) and repr(value) in str(err.value)


def test_prompts_with_tag_ids_are_refused_and_leave_nothing_queued(setup):
    model, tok, tags, engine = setup
    good, bad = prompts(tok, 1)[0], [5, 6, tags.step_open]
    with pytest.raises(ValueError, match="tag"):
        engine.generate([good, bad], SamplingParams(max_new_tokens=4))
    assert not engine.has_work
    assert tags.step_open not in engine.encode_prompt("write <step> like this")  # text keeps tags as text


def fails_after(length: int):
    """A logits processor that raises once a row sees more than `length` ids (a buggy user callable)."""

    def boom(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(visible) > length:
            raise RuntimeError("processor bug")
        return logits

    return boom


def test_a_failing_logits_processor_leaves_no_stuck_request(setup):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)

    boom = fails_after(len(p) + 2)

    with pytest.raises(RuntimeError, match="processor bug"):
        engine.generate([p], SamplingParams(max_new_tokens=8, logits_processors=[boom]))
    assert not engine.has_work
    (r,) = engine.generate([p], SamplingParams(max_new_tokens=4))
    assert r.finish_reason == FinishReason.LENGTH


def test_cancel_frees_the_slots_and_leaves_the_others_untouched(setup):
    model, tok, tags, engine = setup
    ps = prompts(tok, 4, stem="cancel")
    proc = PerPrompt({tuple(p): Script(tok, [[6, 3 + i]]) for i, p in enumerate(ps)})
    params = SamplingParams(temperature=0.0, max_new_tokens=200, logits_processors=[proc])
    (solo,) = engine.generate([ps[0]], params)
    reqs = [r for i, p in enumerate(ps) for r in engine.add_request(p, params, index=i)]
    for _ in range(30):  # into the branches
        engine.step()
    held = engine.pool.slots(reqs[1].uid)
    before = len(engine.pool)
    engine.cancel(reqs[1])  # its row is freed at once
    assert held > 0 and engine.pool.slots(reqs[1].uid) == 0 and len(engine.pool) == before - held
    engine.cancel(reqs[2])
    engine.cancel(reqs[3])
    assert engine.stats().running == 1 and engine.pool.slots(reqs[0].uid) > 0
    queued = engine.add_request(ps[1], params)[0]
    engine.cancel(queued)  # never admitted
    while engine.has_work:
        engine.step()
    out = [engine.rollout(r) for r in [*reqs, queued]]
    assert [r.finish_reason for r in out] == [FinishReason.STOP] + [FinishReason.CANCELLED] * 4
    assert out[0].token_ids == solo.token_ids
    assert out[1].stats.forks == 1 and out[1].stats.total_tokens > 0 and out[4].token_ids == []
    assert layout(out[1], tags, strict=False).position_ids.tolist() == out[1].position_ids


def test_rollouts_round_trip_through_jsonl(setup, tmp_path):
    model, tok, tags, engine = setup
    ps = prompts(tok, 2)
    rollouts = engine.generate(
        ps,
        SamplingParams(
            seed=2, max_new_tokens=200, stop=("zz",), logits_processors=[Script(tok, [[2, 3], [4]])]
        ),
    )
    rollouts += engine.generate(
        ps[:1], SamplingParams(seed=2, max_new_tokens=45, logits_processors=[Script(tok, [[20, 20]])])
    )
    rollouts += engine.generate(
        ps[:1],
        SamplingParams(seed=2, max_new_tokens=200, logits_processors=[Script(tok, [[2]])]),
        mode="sequential",
    )
    path = tmp_path / "out" / "rollouts.jsonl"
    save_rollouts(rollouts, path)
    loaded = load_rollouts(path)
    assert loaded == rollouts and [r.finish_reason for r in loaded] == ["stop", "stop", "length", "stop"]
    assert (
        isinstance(loaded[0].finish_reason, FinishReason) and loaded[0].blocks[1].branches[0].plan_id == "1"
    )
    assert [p.name for p in path.parent.iterdir()] == ["rollouts.jsonl"]  # no temp file left behind
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="rollouts.jsonl:5"):
        load_rollouts(path)


def test_a_failing_processor_in_a_raw_step_loop_ends_only_its_request(setup):
    model, tok, tags, engine = setup
    (p,) = prompts(tok, 1)

    boom = fails_after(len(p) + 2)

    (bad,) = engine.add_request(p, SamplingParams(max_new_tokens=8, logits_processors=[boom]))
    (good,) = engine.add_request(p, SamplingParams(max_new_tokens=8, seed=0))
    raised = 0
    for _ in range(50):
        if not engine.has_work:
            break
        try:
            engine.step()
        except RuntimeError:
            raised += 1
    assert raised == 1 and not engine.has_work
    assert engine.rollout(bad).finish_reason == FinishReason.ERROR and "processor bug" in (
        bad.stop_reason or ""
    )
    assert engine.rollout(good).finish_reason == FinishReason.LENGTH
