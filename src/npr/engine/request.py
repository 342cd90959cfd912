"""One request's decoding state, how a prompt becomes ids, and how a finished state becomes a `Rollout`.

Every backend that runs our decoding loop keeps a `RequestState` per sample; callers see it only through
the read-only `npr.engine.RequestHandle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from npr.engine.kv import Feed
from npr.engine.params import FinishReason, Mode, SamplingParams
from npr.engine.rollout import BlockRecord, Rollout, RolloutStats
from npr.format import StreamParser, TagIds

Prompt = str | Sequence[int] | Sequence[dict]


def eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Ids that end an answer: the tokenizer's end-of-sequence plus the generation config's (one or a list)."""
    extra = getattr(generation_config, "eos_token_id", None)
    extra = extra if isinstance(extra, list) else [extra]
    return {int(e) for e in [tokenizer.eos_token_id, *extra] if e is not None}


def encode_prompt(tokenizer: Any, tags: TagIds, prompt: Prompt, *, allow_tags: bool = False) -> list[int]:
    """Chat messages, a string or token ids → prompt ids. Tag ids are refused unless `allow_tags` (the
    paper's official prompt is tokenised with them); strings keep tag text as ordinary sub-tokens."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    elif prompt and isinstance(prompt[0], dict):
        from npr.data import encode_messages

        ids = encode_messages(tokenizer, list(prompt))  # type: ignore[arg-type]
    else:
        ids = [int(t) for t in prompt]  # type: ignore[arg-type]
    if not ids:
        raise ValueError("empty prompt")
    tag_set = set(tags.as_tuple())
    bad = [] if allow_tags else [i for i, t in enumerate(ids) if t in tag_set]
    if bad:
        raise ValueError(f"prompt token {bad[0]} is a tag id; tags may only be generated")
    return list(ids)


@dataclass
class BranchState:
    plan_id: str
    index: int
    block: int  # pool-wide block uid
    start_pos: int  # g + 1
    parser: StreamParser
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def next_pos(self) -> int:
        return self.start_pos + len(self.tokens)


@dataclass
class RequestState:
    uid: int
    index: int
    sample: int
    prompt_ids: list[int]
    params: SamplingParams
    mode: Mode
    generator: torch.Generator
    parser: StreamParser
    stop_on_violation: bool
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[BranchState] = field(default_factory=list)  # of the open block; empty in the trunk
    blocks: list[BlockRecord] = field(default_factory=list)
    g: int = -1  # position of the open block's </guideline>
    trunk_text: str = ""
    step_start: int = 0  # response index of the last <step> written in the trunk (sequential mode)
    used: int = 0  # the global ledger: every generated token of every branch
    feeds: list[Feed] = field(default_factory=list)  # tokens to append at the next step
    samples: list[tuple[int, BranchState | None]] = field(
        default_factory=list
    )  # (feed index, unit; None=trunk)
    finish: FinishReason | None = None
    stop_reason: str | None = None
    started: float = 0.0
    wall_time: float = 0.0

    @property
    def next_pos(self) -> int:
        return self.positions[-1] + 1 if self.positions else len(self.prompt_ids)


def build_rollout(r: RequestState, tokenizer: Any, eos_ids: set[int]) -> Rollout:
    """The result of a (finished or cancelled) request: canonical ids, positions, log-probs, text, stats."""
    ids = r.response[:-1] if r.response and r.response[-1] in eos_ids else r.response
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if r.stop_reason in r.params.stop:
        text = text[: text.rfind(r.stop_reason)]
    prompt_len = len(r.prompt_ids)
    stats = RolloutStats(
        total_tokens=len(r.response),
        critical_path_tokens=(max(r.positions) - prompt_len + 1) if r.positions else 0,
        forks=len(r.blocks),
        branches=sum(len(b.branches) for b in r.blocks),
        wall_time=r.wall_time,
    )
    return Rollout(
        index=r.index,
        sample=r.sample,
        prompt_ids=list(r.prompt_ids),
        token_ids=list(r.response),
        position_ids=list(range(prompt_len)) + r.positions,
        sampled_logprobs=r.logprobs,
        loss_mask=r.loss_mask,
        text=text,
        finish_reason=r.finish or FinishReason.CANCELLED,
        stop_reason=r.stop_reason,
        mode=r.mode,
        blocks=r.blocks,
        stats=stats,
    )
