"""The decoding loop behind the server: one thread owns the engine and steps it while there is work.

HTTP handlers never touch the engine (it is not thread-safe). They put a `Job` (one HTTP request: n samples
of one or more prompts) or a cancellation in the scheduler's inbox and read the job's events on their event
loop. The thread encodes prompts, adds them to the engine (they join the running batch at the next step:
continuous batching), steps, and after every step diffs each live request for streamed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

from npr.engine import Engine, Rollout, SamplingParams
from npr.serve.schemas import ApiError, BranchRef
from npr.serve.stream import RequestWatcher

log = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages


# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Admitted:
    prompt_tokens: int  # over all prompts of the job (each counted once, whatever n)


@dataclass(frozen=True)
class ChoiceDelta:
    choice: int
    text: str
    branch: BranchRef | None


@dataclass(frozen=True)
class ChoiceDone:
    choice: int
    rollout: Rollout


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Admitted | ChoiceDelta | ChoiceDone | Failed


class Job:
    """One HTTP request. Created and read on the event loop; filled by the scheduler thread via `post`.

    Choice `i * n + j` is sample j of prompt i, as in OpenAI's responses.
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        mode: Literal["parallel", "sequential"],
        *,
        stream: bool,
        prompt_field: str,
    ):
        self.prompts, self.params, self.mode, self.stream = list(prompts), params, mode, stream
        self.prompt_field = prompt_field  # the request field errors about the prompt name
        self.loop = asyncio.get_running_loop()
        self.answered = False  # loop side: the client got every choice (or the error); nothing to cancel
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()
        self.watchers: list[RequestWatcher] = []  # scheduler thread only

    def post(self, events: list[Event]) -> None:
        """Hand events to the job's loop (from any thread); a closed loop means the client is gone."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        self._events.extend(events)
        self._ready.set()

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""
        if not self._events:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        return self._events.popleft()


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class Counters:
    requests_total: int = 0
    requests_finished_total: int = 0
    requests_cancelled_total: int = 0
    requests_failed_total: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    forks_total: int = 0
    branches_total: int = 0
    steps_total: int = 0


class _Stop:
    """Inbox sentinel: leave the loop."""


@dataclass(frozen=True)
class _Cancel:
    job: Job


class Scheduler:
    """Owns `engine` on a background thread; `submit`/`cancel` are safe from any thread."""

    def __init__(self, engine: Engine, *, tps_window: float = 10.0):
        self.engine = engine
        self.tps_window = tps_window
        self.counters = Counters()
        self._inbox: queue.SimpleQueue[Job | _Cancel | _Stop] = queue.SimpleQueue()
        self._jobs: list[Job] = []
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for the TPS window
        self._started = time.monotonic()
        self._gauges: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="npr-scheduler", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self._refresh_gauges()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(_Stop())
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        self._inbox.put(_Cancel(job))

    def metrics(self) -> dict[str, int | float]:
        """Counters, and gauges as of the last step; TPS = tokens generated in the last `tps_window`
        seconds over that window (so it decays to 0 when idle)."""
        now = time.monotonic()
        window = min(self.tps_window, now - self._started)
        recent = sum(n for t, n in list(self._recent) if t > now - self.tps_window)
        counters = {f.name: getattr(self.counters, f.name) for f in fields(self.counters)}
        tps = recent / window if window > 0 else 0.0
        return {**counters, **self._gauges, "tokens_per_second": tps, "uptime_seconds": now - self._started}

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            try:
                for command in self._commands(block=not self.engine.has_work):
                    if isinstance(command, _Stop):
                        return self._fail_all(
                            ApiError(503, "the server is shutting down", type="server_error")
                        )
                    if isinstance(command, _Cancel):
                        self._cancel(command.job)
                    else:
                        self._admit(command)
                if self.engine.has_work:
                    self.engine.step()
                    self.counters.steps_total += 1
                self._refresh_gauges()  # before answering: a client that reads /metrics next sees this step
                self._publish()
            except Exception as e:  # an engine failure must not take the server down: fail what was live
                log.exception("the decoding loop failed")
                self._fail_all(ApiError(500, f"engine failure: {e!r}", type="server_error"))
            self._refresh_gauges()

    def _commands(self, *, block: bool) -> list[Job | _Cancel | _Stop]:
        out = [self._inbox.get()] if block else []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    def _admit(self, job: Job) -> None:
        try:
            ids = [self.engine.encode_prompt(p) for p in job.prompts]
        except Exception as e:  # a pure function of the input (a chat template may raise anything): a 400
            return job.post([Failed(ApiError(400, str(e), param=job.prompt_field))])
        context = self.engine.max_positions
        for i, p in enumerate(ids):
            if len(p) >= context:  # the first generated token needs a position too
                where = job.prompt_field + (f"[{i}]" if len(ids) > 1 else "")
                message = f"{where}: the prompt has {len(p)} tokens; the model's context is {context} tokens"
                return job.post(
                    [Failed(ApiError(400, message, param=job.prompt_field, code="context_length_exceeded"))]
                )
        self._jobs.append(job)  # first, so that a failure below answers this job too
        tokenizer, eos = self.engine.tokenizer, self.engine.eos_ids
        for i, p in enumerate(ids):
            for r in self.engine.add_request(p, job.params, job.mode, index=i):
                job.watchers.append(RequestWatcher(r, tokenizer, eos, detokenize=job.stream))
        self.counters.requests_total += 1
        self.counters.prompt_tokens_total += sum(map(len, ids))
        job.post([Admitted(prompt_tokens=sum(map(len, ids)))])

    def _cancel(self, job: Job) -> None:
        if job not in self._jobs:
            return  # finished (or failed) before the cancellation arrived
        for w in job.watchers:
            self.engine.cancel(w.request)
        self._jobs.remove(job)
        self.counters.requests_cancelled_total += 1

    def _publish(self) -> None:
        """Diff every live request; post deltas and finished choices; retire finished jobs."""
        now, tokens = time.monotonic(), 0
        for job in list(self._jobs):
            events: list[Event] = []
            for choice, w in enumerate(job.watchers):
                if w.done:
                    continue
                progress = w.poll()
                tokens += progress.tokens
                self.counters.forks_total += progress.forks
                self.counters.branches_total += progress.branches
                events += [ChoiceDelta(choice, d.text, d.branch) for d in progress.deltas]
                if w.done:
                    events.append(ChoiceDone(choice, self.engine.rollout(w.request)))
            if all(w.done for w in job.watchers):
                self._jobs.remove(job)
                self.counters.requests_finished_total += 1
            if events:
                job.post(events)
        self.counters.generated_tokens_total += tokens
        if tokens:
            self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - self.tps_window:
            self._recent.popleft()

    def _fail_all(self, error: ApiError) -> None:
        """Answer every live job with `error` and start the engine afresh."""
        for job in self._jobs:
            job.post([Failed(error)])
        self.counters.requests_failed_total += len(self._jobs)
        self._jobs = []
        self.engine.abort_all()

    def _refresh_gauges(self) -> None:
        stats = self.engine.stats()
        self._gauges = {
            "requests_running": len(self._jobs),
            "samples_running": stats.running,
            "samples_waiting": stats.waiting,
            "kv_slots": stats.kv_slots,
            "kv_bytes": stats.kv_bytes,
        }
