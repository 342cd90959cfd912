"""The decoding loop: admit requests, fork at </guideline>, decode every branch of every request in one
forward per step, merge at the longest branch, and hand back Rollouts (DESIGN §3–§4).

The loop is the same on every backend; a backend is the cache that turns a step's feeds (token, position,
block, branch) into logits (`CacheBackend`): `npr.engine.kv.KVPool` on a Hugging Face model, or
`npr.engine.llamacpp.LlamaCppCache` on llama.cpp.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from npr.engine.handle import EngineStats, RequestHandle, add_requests, run_to_completion
from npr.engine.kv import Feed, KVPool
from npr.engine.params import FinishReason, Mode, SamplingParams
from npr.engine.request import BranchState, Prompt, RequestState, build_rollout, encode_prompt, eos_ids
from npr.engine.rollout import BlockRecord, BranchRecord, Rollout
from npr.engine.sampling import sample_tokens
from npr.format import Event, EventKind, StreamParser, TagIds

_FORK_ERRORS = {"no_plan", "too_many_plans", "missing_id", "duplicate_id", "text_in_guideline", "stray_text"}
"""Violations at a `</guideline>` that refuse the fork: the guideline `check` would reject for its plans."""


class CacheBackend(Protocol):
    """The part of an engine that holds the KV cache and runs the model."""

    device: torch.device  # where per-request generators live
    max_positions: int  # the model's context length

    def forward(self, feeds: list[Feed], sample_at: list[int]) -> torch.Tensor:
        """Append `feeds` to their requests' caches; float32 logits `[len(sample_at), V]` at those feeds."""
        ...

    def check_request(self, cells: int, sequences: int) -> None:
        """Raise a ValueError naming the limit if a request needing this much could never fit the cache.

        `cells`: prompt + max_new_tokens (its worst case); `sequences`: 1, plus max_plans in parallel mode.
        """
        ...

    def reserve(self, owner: int, cells: int, sequences: int) -> bool:
        """Claim room for a request about to be admitted; False: not now (others must finish first)."""
        ...

    def release(self, owner: int) -> None: ...
    def collect(self) -> None: ...
    def reset(self) -> None: ...
    def __len__(self) -> int: ...
    def bytes_used(self) -> int: ...


def _worst_case(prompt_len: int, params: SamplingParams, mode: Mode) -> tuple[int, int]:
    """Cache cells and sequences a request may need at most (the ledger bounds every generated token)."""
    return prompt_len + params.max_new_tokens, 1 + (params.max_plans if mode == "parallel" else 0)


class DecodingEngine:
    """Native parallel decoding over one shared cache (any `CacheBackend`).

    `max_batch_requests` bounds live requests; `prefill_tokens` bounds prompt tokens admitted per step
    (new requests join the running batch, continuous-batching style). `allow_prompt_tags` accepts prompts
    that contain tag ids (the paper's official prompt is tokenised that way); structure is parsed only from
    the response, so such a prompt never forks.
    """

    backend = "abstract"

    def __init__(
        self,
        tokenizer,
        cache: CacheBackend,
        eos_ids: set[int],
        *,
        max_batch_requests: int = 64,
        prefill_tokens: int = 4096,
        allow_prompt_tags: bool = False,
    ):
        self.tokenizer = tokenizer
        self.allow_prompt_tags = allow_prompt_tags
        self.tags = TagIds.from_tokenizer(tokenizer)
        self.pool = cache
        self.max_batch_requests = max_batch_requests
        self.prefill_tokens = prefill_tokens
        self.max_positions = cache.max_positions
        self.eos_ids = eos_ids
        self._pieces: dict[int, str] = {}
        self._uids = itertools.count()
        self._blocks = itertools.count()
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    # ------------------------------------------------------------------ public API

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, mode: Mode = "parallel"
    ) -> list[Rollout]:
        """Decode every prompt `params.n` times; rollouts come back prompt-major, in input order."""
        params = params or SamplingParams()
        return run_to_completion(self, add_requests(self, prompts, params, mode))

    def add_request(
        self, prompt: Prompt, params: SamplingParams, mode: Mode = "parallel", index: int = 0
    ) -> list[RequestHandle]:
        """Queue n samples of one prompt; they are admitted at the next `step()`."""
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {mode!r}")
        ids = self.encode_prompt(prompt)
        if len(ids) + 1 > self.max_positions:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_positions}")
        self.pool.check_request(*_worst_case(len(ids), params, mode))
        stop_on_violation = params.stop_on_violation
        if stop_on_violation is None:
            stop_on_violation = mode == "parallel"
        out = []
        for j in range(params.n):
            gen = torch.Generator(device=self.pool.device)
            seed = params.seed + j if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            gen.manual_seed(seed)
            r = RequestState(
                uid=next(self._uids),
                index=index,
                sample=j,
                prompt_ids=ids,
                params=params,
                mode=mode,
                generator=gen,
                parser=StreamParser(max_plans=params.max_plans),
                stop_on_violation=stop_on_violation,
            )
            self.waiting.append(r)
            out.append(RequestHandle(r))
        return out

    def cancel(self, handle: RequestHandle) -> None:
        """Withdraw a request (e.g. its client went away) and free its cache slots."""
        request: RequestState = handle._state
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        if request.finish is None:
            self._finish(request, FinishReason.CANCELLED)
        self.pool.collect()

    def abort_all(self) -> None:
        """Cancel everything queued or running and start from an empty cache (e.g. after a failure)."""
        for r in [*self.waiting, *self.running]:
            if r.finish is None:
                r.finish = FinishReason.CANCELLED
                r.feeds, r.samples = [], []
        self.waiting.clear()
        self.running = []
        self.pool.reset()

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Chat messages, a string or token ids → prompt ids; tag ids only if `allow_prompt_tags`."""
        return encode_prompt(self.tokenizer, self.tags, prompt, allow_tags=self.allow_prompt_tags)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), len(self.waiting), len(self.pool), self.pool.bytes_used())

    def step(self) -> list[RequestHandle]:
        """Admit waiting requests, run one batched forward, sample one token per live unit.

        Returns the requests that finished during this step. If a logits processor raised, its request
        ends with finish reason `error`, the other requests still advance, and the first error is re-raised
        once the step is complete.
        """
        self._admit()
        errors: list[Exception] = []
        feeds: list[Feed] = []
        sample_at: list[int] = []
        targets: list[tuple[RequestState, BranchState | None]] = []
        for r in self.running:
            if r.finish is not None:
                continue
            if r.used + len(r.samples) > r.params.max_new_tokens:
                self._finish(r, FinishReason.LENGTH)  # never let a step overdraw the ledger
                continue
            base = len(feeds)
            feeds += r.feeds
            for k, unit in r.samples:
                sample_at.append(base + k)
                targets.append((r, unit))
            r.feeds, r.samples = [], []
        if feeds:
            logits = self.pool.forward(feeds, sample_at)  # [P, V]
            logprobs = torch.log_softmax(logits, dim=-1)
            rows, processed = [], []
            for k, (r, unit) in enumerate(targets):
                if r.finish is not None:
                    continue
                try:
                    processed.append(self._process(r, unit, logits[k]))
                    rows.append(k)
                except Exception as e:  # only the request whose processor failed ends; others go on
                    self._finish(r, FinishReason.ERROR, stop_reason=f"{type(e).__name__}: {e}")
                    errors.append(e)
            live = [targets[k] for k in rows]
            tokens = sample_tokens(
                torch.stack(processed) if processed else logits[:0],
                [r.params for r, _ in live],
                [r.generator for r, _ in live],
                [self._penalised(r, unit) for r, unit in live],
            )
            for k, (r, unit), token in zip(rows, live, tokens, strict=True):
                if r.finish is None:  # an earlier unit of the same request may have ended it
                    self._emit(r, unit, token, float(logprobs[k, token]))
        done = [RequestHandle(r) for r in self.running if r.finish is not None]
        self.running = [r for r in self.running if r.finish is None]
        self.pool.collect()
        if errors:  # the step is complete and consistent; now tell the caller
            raise errors[0]
        return done

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling

    def _admit(self) -> None:
        budget = self.prefill_tokens
        while self.waiting and len(self.running) < self.max_batch_requests:
            r = self.waiting[0]
            if len(r.prompt_ids) > budget and budget != self.prefill_tokens:
                break  # a long prompt waits for a step of its own
            if not self.pool.reserve(r.uid, *_worst_case(len(r.prompt_ids), r.params, r.mode)):
                break  # the cache is full: wait for running requests to finish
            self.waiting.popleft()
            budget -= len(r.prompt_ids)
            r.started = time.perf_counter()
            r.feeds = [Feed(r.uid, t, i) for i, t in enumerate(r.prompt_ids)]
            r.samples = [(len(r.feeds) - 1, None)]
            self.running.append(r)

    def _finish(self, r: RequestState, reason: FinishReason, stop_reason: str | None = None) -> None:
        if r.branches:  # cut inside a block: keep what the branches wrote, in canonical order
            self._flush_branches(r)
        r.finish, r.stop_reason = reason, stop_reason
        r.feeds, r.samples = [], []
        r.wall_time = time.perf_counter() - r.started if r.started else 0.0
        self.pool.release(r.uid)

    # ------------------------------------------------------------------ one token

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return piece

    def _parse(self, r: RequestState, parser: StreamParser, token: int) -> list[Event]:
        """Parallel mode reads structure from tag ids only (the layout does too); sequential mode reads
        text, so a stage-1 model that spells tags in sub-tokens is parsed like the reward parses it."""
        if r.mode == "parallel":
            return parser.feed_token(self._piece(token), self.tags.tag_of(token))
        return parser.feed(self._piece(token))

    def _visible(self, r: RequestState, unit: BranchState | None) -> list[int]:
        """Token ids the unit can see, canonical order: prompt, finished blocks, trunk, own branch."""
        return r.prompt_ids + r.response + (unit.tokens if unit is not None else [])

    def _process(self, r: RequestState, unit: BranchState | None, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits through the request's logits processors (a copy; the raw row stays)."""
        if not r.params.logits_processors:
            return logits
        visible, logits = self._visible(r, unit), logits.clone()
        for fn in r.params.logits_processors:
            logits = fn(visible, logits)
        return logits

    def _penalised(self, r: RequestState, unit: BranchState | None) -> list[int] | None:
        """Ids the branch repetition penalty applies to: the open step's tokens, else none."""
        if r.params.branch_repetition_penalty == 1.0:
            return None
        if unit is not None:
            return unit.tokens
        if r.parser.state == "step":  # sequential mode writes its steps in the trunk
            return r.response[r.step_start :]
        return None

    def _emit(self, r: RequestState, unit: BranchState | None, token: int, logprob: float) -> None:
        r.used += 1
        if unit is None:
            self._trunk_token(r, token, logprob)
        else:
            self._branch_token(r, unit, token, logprob)

    def _trunk_token(self, r: RequestState, token: int, logprob: float) -> None:
        pos = r.next_pos
        r.response.append(token)
        r.logprobs.append(logprob)
        r.loss_mask.append(1)
        r.positions.append(pos)
        if token in self.eos_ids:
            if r.parser.state != "outside" and r.stop_on_violation:
                return self._finish(
                    r, FinishReason.INVALID_STRUCTURE, f"end of sequence inside <{r.parser.state}>"
                )
            return self._finish(r, FinishReason.STOP)
        if token == self.tags.step_open:
            r.step_start = len(r.response) - 1
        piece = self._piece(token)
        r.trunk_text += piece
        for s in r.params.stop:
            if s in r.trunk_text[-(len(s) + len(piece)) :]:
                return self._finish(r, FinishReason.STOP, stop_reason=s)
        for event in self._parse(r, r.parser, token):
            if event.kind == EventKind.VIOLATION and r.stop_on_violation:
                code = event.code or "violation"
                reason = FinishReason.INVALID_FORK if code in _FORK_ERRORS else FinishReason.INVALID_STRUCTURE
                return self._finish(r, reason, stop_reason=f"{code}: {event.message}")
            if event.kind == EventKind.GUIDELINE_CLOSED and r.mode == "parallel":
                r.g = pos
                return self._fork(r, token, event.plan_ids)
        if not self._room(r, pos + 1):
            return None
        r.feeds.append(Feed(r.uid, token, pos))
        r.samples.append((len(r.feeds) - 1, None))
        return None

    def _room(self, r: RequestState, next_pos: int) -> bool:
        """Whether a unit whose next token sits at next_pos may decode it; finish the request if not."""
        if r.used >= r.params.max_new_tokens or next_pos - len(r.prompt_ids) >= r.params.path_limit:
            self._finish(r, FinishReason.LENGTH)
            return False
        if next_pos >= self.max_positions:
            self._finish(r, FinishReason.LENGTH, stop_reason="context")
            return False
        return True

    def _fork(self, r: RequestState, close_token: int, plan_ids: tuple[str, ...]) -> None:
        # Each branch starts with forced "<step>" + "ID:"; the reserve keeps room for a few tokens of
        # content per branch, its </step> and the merge's <takeaway>, or the fork is refused.
        forced = [
            [self.tags.step_open, *self.tokenizer.encode(f"{pid}:", add_special_tokens=False)]
            for pid in plan_ids
        ]
        reserve = sum(len(f) + r.params.fork_reserve for f in forced) + 1
        depth = r.g + 1 - len(r.prompt_ids) + max(map(len, forced)) + r.params.fork_reserve + 1
        if r.used + reserve > r.params.max_new_tokens or depth > r.params.path_limit:
            return self._finish(
                r, FinishReason.BUDGET, stop_reason=f"fork of {len(plan_ids)} needs {reserve}"
            )
        if len(r.prompt_ids) + depth >= self.max_positions:
            return self._finish(r, FinishReason.LENGTH, stop_reason="context")
        block = next(self._blocks)
        r.feeds = [Feed(r.uid, close_token, r.g)]
        for i, (pid, ids) in enumerate(zip(plan_ids, forced, strict=True)):
            b = BranchState(pid, i, block, r.g + 1, StreamParser(max_plans=r.params.max_plans, start="step"))
            for t in ids:
                r.feeds.append(Feed(r.uid, t, b.next_pos, block, i))
                b.tokens.append(t)
                b.logprobs.append(0.0)
                b.loss_mask.append(0)
            for t in ids[1:]:
                self._parse(r, b.parser, t)
            r.samples.append((len(r.feeds) - 1, b))
            r.branches.append(b)
            r.used += len(ids)
        return None

    def _branch_token(self, r: RequestState, b: BranchState, token: int, logprob: float) -> None:
        pos = b.next_pos
        b.tokens.append(token)
        b.logprobs.append(logprob)
        b.loss_mask.append(1)
        if token in self.eos_ids:
            return self._finish(
                r, FinishReason.INVALID_STRUCTURE, stop_reason="end of sequence inside a step"
            )
        for event in self._parse(r, b.parser, token):
            if event.kind == EventKind.VIOLATION:
                return self._finish(
                    r, FinishReason.INVALID_STRUCTURE, stop_reason=f"{event.code}: {event.message}"
                )
            if event.kind == EventKind.STEP_CLOSED:
                b.done = True
        r.feeds.append(Feed(r.uid, token, pos, b.block, b.index))  # </step> too: the takeaway reads it
        if not b.done:
            if not self._room(r, pos + 1):
                return None
            r.samples.append((len(r.feeds) - 1, b))
        elif all(x.done for x in r.branches):
            self._merge(r)
        return None

    def _flush_branches(self, r: RequestState) -> int:
        """Append the open block's branches to the response in canonical order; return the longest."""
        longest = 0
        record = BlockRecord(r.g, [])
        for b in r.branches:
            record.branches.append(BranchRecord(b.plan_id, len(r.response), len(b.tokens), b.done))
            r.response += b.tokens
            r.logprobs += b.logprobs
            r.loss_mask += b.loss_mask
            r.positions += range(b.start_pos, b.next_pos)
            for t in b.tokens:
                self._parse(r, r.parser, t)
            longest = max(longest, len(b.tokens))
        r.blocks.append(record)
        r.branches = []
        return longest

    def _merge(self, r: RequestState) -> None:
        # The takeaway sits right after the longest branch (g + 1 + max len) and sees every branch.
        pos = r.g + 1 + self._flush_branches(r)
        r.blocks[-1].takeaway_position = pos
        if not self._room(r, pos):
            return
        r.used += 1
        r.response.append(self.tags.takeaway_open)
        r.logprobs.append(0.0)
        r.loss_mask.append(0)
        r.positions.append(pos)
        self._parse(r, r.parser, self.tags.takeaway_open)
        r.feeds.append(Feed(r.uid, self.tags.takeaway_open, pos))
        r.samples.append((len(r.feeds) - 1, None))

    # ------------------------------------------------------------------ results

    def rollout(self, handle: RequestHandle) -> Rollout:
        return build_rollout(handle._state, self.tokenizer, self.eos_ids)


class ParallelEngine(DecodingEngine):
    """The reference backend: our KV pool on any Hugging Face causal LM (CPU or CUDA), exact by design."""

    backend = "hf"

    def __init__(self, model, tokenizer, **options: Any):
        """`options`: those of `DecodingEngine` (max_batch_requests, prefill_tokens, allow_prompt_tags)."""
        self.model = model.eval()
        stop_ids = eos_ids(tokenizer, getattr(model, "generation_config", None))
        pool = KVPool(model, pad_id=tokenizer.pad_token_id or 0)
        super().__init__(tokenizer, pool, stop_ids, **options)
