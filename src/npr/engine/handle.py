"""What callers see of a request: a read-only handle, and the one loop that drives a batch to completion.

Consumers (evaluation, rejection sampling, RL rollouts, the server) hold `RequestHandle`s and never touch an
engine's private request state, so every backend can keep its own bookkeeping behind the same view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, overload

from npr.engine.params import FinishReason, Mode, SamplingParams
from npr.engine.rollout import BlockRecord, Rollout

if TYPE_CHECKING:
    from npr.engine.core import Prompt


class ReadOnlyIds(Sequence[int]):
    """A live, read-only view of a growing list of token ids (no copy per look)."""

    __slots__ = ("_ids",)

    def __init__(self, ids: list[int]):
        self._ids = ids

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        return self._ids[i]

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __repr__(self) -> str:
        return f"ReadOnlyIds({self._ids!r})"


@dataclass(frozen=True)
class OpenBranch:
    """A branch of the block being decoded: its index, its plan's ID and its tokens so far."""

    index: int
    plan_id: str
    tokens: ReadOnlyIds
    done: bool


class RequestHandle:
    """One sample of one prompt, as the engine decodes it. Read-only; the engine updates it every step.

    `response` holds the committed response ids in canonical order (the trunk, and each closed block's
    branches in branch order); the open block's branches are in `open_branches` until they merge.
    """

    __slots__ = ("_state",)

    def __init__(self, state: Any):
        self._state = state

    uid = property(lambda self: self._state.uid)
    index = property(lambda self: self._state.index, doc="prompt index in its add_request/generate call")
    sample = property(lambda self: self._state.sample, doc="which of the n samples of that prompt")
    mode = property(lambda self: self._state.mode)

    @property
    def params(self) -> SamplingParams:
        return self._state.params

    @property
    def prompt_ids(self) -> ReadOnlyIds:
        return ReadOnlyIds(self._state.prompt_ids)

    @property
    def response(self) -> ReadOnlyIds:
        return ReadOnlyIds(self._state.response)

    @property
    def blocks(self) -> tuple[BlockRecord, ...]:
        """Closed blocks (merged, or cut by the finish)."""
        return tuple(self._state.blocks)

    @property
    def open_branches(self) -> tuple[OpenBranch, ...]:
        return tuple(
            OpenBranch(b.index, b.plan_id, ReadOnlyIds(b.tokens), b.done) for b in self._state.branches
        )

    @property
    def tokens_used(self) -> int:
        """The global ledger: every generated token of every branch, forced ones included."""
        return self._state.used

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._state.finish

    @property
    def stop_reason(self) -> str | None:
        return self._state.stop_reason

    @property
    def finished(self) -> bool:
        return self._state.finish is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestHandle) and other._state is self._state

    def __hash__(self) -> int:
        return id(self._state)

    def __repr__(self) -> str:
        return f"RequestHandle(uid={self.uid}, index={self.index}, sample={self.sample}, finish={self.finish_reason})"


@dataclass(frozen=True)
class EngineStats:
    """Gauges a server reports: samples decoding and queued, cache cells in use and their bytes."""

    running: int
    waiting: int
    kv_slots: int
    kv_bytes: int


class Engine(Protocol):
    """What every backend offers (`npr.engine.load_engine` returns one)."""

    backend: str
    tokenizer: Any
    max_positions: int
    eos_ids: set[int]

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, mode: Mode = "parallel"
    ) -> list[Rollout]: ...
    def add_request(
        self, prompt: Prompt, params: SamplingParams, mode: Mode = "parallel", index: int = 0
    ) -> list[RequestHandle]: ...
    def step(self) -> list[RequestHandle]: ...
    def cancel(self, handle: RequestHandle) -> None: ...
    def abort_all(self) -> None: ...
    def rollout(self, handle: RequestHandle) -> Rollout: ...
    def encode_prompt(self, prompt: Prompt) -> list[int]: ...
    def stats(self) -> EngineStats: ...
    @property
    def has_work(self) -> bool: ...


def add_requests(
    engine: Engine,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams],
    mode: Mode = "parallel",
    indices: Sequence[int] | None = None,
) -> list[RequestHandle]:
    """Queue every prompt (`params.n` samples each; one params for all or one per prompt), all or none:
    if one prompt is refused, the ones already queued are cancelled before the error propagates."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    handles: list[RequestHandle] = []
    try:
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
            handles += engine.add_request(prompt, p, mode, index=i if indices is None else indices[i])
    except BaseException:
        for h in handles:
            engine.cancel(h)
        raise
    return handles


def run_to_completion(
    engine: Engine,
    handles: Sequence[RequestHandle],
    on_finish: Callable[[RequestHandle], None] | None = None,
) -> list[Rollout]:
    """Step `engine` until every handle has finished; return their rollouts in the handles' order.

    `on_finish` is called once per handle as it finishes (e.g. to advance a progress bar). On any error
    (a failing logits processor, Ctrl-C) the handles still open are cancelled, so the engine stays usable.
    """
    mine = set(handles)
    try:
        for h in handles:
            if h.finished and on_finish is not None:
                on_finish(h)
        while any(not h.finished for h in handles):
            for h in engine.step():
                if h in mine and on_finish is not None:
                    on_finish(h)
    except BaseException:
        for h in handles:
            if not h.finished:
                engine.cancel(h)
        raise
    return [engine.rollout(h) for h in handles]
