"""Answers, verification and the rewards of DESIGN §5–§6.

Correctness is decided by ``math-verify`` in worker processes: its own timeouts use ``signal.alarm`` (main
thread only), so they are switched off and a hard per-call timeout is enforced from outside instead: a
worker that overruns is killed and replaced, and the answer counts as wrong. A pathological answer costs
one timeout, never a hang or a crash of the caller.

Rewards are pluggable per task: every reward function takes an optional ``check(response_text, example)``
that replaces the default math check (e.g. one that also checks intermediate results, since on small
procedural tasks an answer-only reward pays lucky guesses).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import IO

from npr.data import Example
from npr.format import check as check_format
from npr.format import extract_answer

__all__ = [
    "DEFAULT_TIMEOUT",
    "EMPTY_RESPONSE_REWARD",
    "AnswerCheck",
    "Verifier",
    "accuracy_reward",
    "accuracy_reward_batch",
    "extract_answer",
    "extract_answer_or_last_number",
    "format_penalty",
    "format_penalty_batch",
    "stage1_reward",
    "stage1_reward_batch",
    "stage3_reward",
    "stage3_reward_batch",
    "verify",
    "verify_batch",
]

DEFAULT_TIMEOUT = 5.0
"""Seconds one answer may take to parse and compare (DESIGN §6)."""

EMPTY_RESPONSE_REWARD = -2.0
"""Stage-1 reward of an empty response (DESIGN §5, the floor of the format penalty)."""

AnswerCheck = Callable[[str, Example], bool]
"""A task's own verifier: ``(response_text, example) -> correct``."""

_INTEGER = re.compile(r"-?\d+")
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_READY = "ready"
# One of each kind math-verify treats differently: LaTeX numbers, intervals, sets, symbolic expressions.
_WARMUP = [("\\frac{1}{2}", "0.5"), ("(1,2]", "(1,2]"), ("\\{2,1\\}", "\\{1,2\\}"), ("x^2+1", "1+x^{2}")]


def extract_answer_or_last_number(text: str) -> tuple[str | None, bool]:
    """The boxed answer, else the last number of the text; the flag is True when the fallback was used.

    >>> extract_answer_or_last_number("so 3 + 4 = 7")
    ('7', True)
    >>> extract_answer_or_last_number("nothing here")
    (None, False)
    """
    answer = extract_answer(text)
    if answer is not None:
        return answer, False
    numbers = _LAST_NUMBER.findall(text)
    if not numbers:
        return None, False
    return numbers[-1].replace(",", ""), True


def _answer_of(response_or_answer: str) -> str | None:
    """What gets compared: the boxed content when there is a ``\\boxed``, else the text itself."""
    if "\\boxed" in response_or_answer:
        return extract_answer(response_or_answer)
    return response_or_answer


def _quick_verdict(answer: str, gold: str) -> bool | None:
    """Verdicts that need no parser (None: ask math-verify): empty, identical, or two plain integers."""
    if not answer or not gold:
        return False
    if answer == gold:
        return True
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold):  # most procedural golds
        return int(answer) == int(gold)
    return None


def _as_latex(answer: str) -> str:
    """Wrap a bare answer in ``$…$`` so math-verify reads it as LaTeX; leave delimited text alone."""
    answer = answer.strip()
    return answer if _UNESCAPED_DOLLAR.search(answer) else f"${answer}$"


# ---- worker side -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> list:
    """Parse once per worker (a group of G samples shares one gold); a plain integer skips the LaTeX parser."""
    if _INTEGER.fullmatch(text.strip()):
        import sympy

        return [sympy.Integer(int(text))]
    from math_verify import parse

    return parse(_as_latex(text), parsing_timeout=None)


def _math_equal(answer: str, gold: str) -> bool:
    """math-verify's verdict, gold first; any error counts as wrong."""
    from math_verify import verify as mv_verify

    try:
        return bool(mv_verify(_parse(gold), _parse(answer), timeout_seconds=None))
    except Exception:
        return False


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone, so a worker stuck in a pathological answer never outlives its run."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker_main() -> None:
    """Answer JSON ``[answer, gold]`` lines on stdin with ``1``/``0`` lines; announce readiness first.

    The protocol writes to a private copy of stdout; ``print`` in a library goes to stderr instead.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its timeouts are off: we know
    for answer, gold in _WARMUP:  # lazy imports and grammar setup (~1 s) must not eat a job's timeout
        _math_equal(answer, gold)
    out.write(_READY + "\n")
    out.flush()
    for line in sys.stdin:
        answer, gold = json.loads(line)
        out.write("1\n" if _math_equal(answer, gold) else "0\n")
        out.flush()


# ---- pool side ---------------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    """The worker imports this package from wherever the parent found it."""
    src = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src if not path else os.pathsep.join([src, path])}


class _Worker:
    """One worker: a plain subprocess, not multiprocessing, so the caller's ``__main__`` is never re-run."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from npr.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_env(),
        )
        self.ready = False
        self.job: int | None = None  # index of the job it runs
        self.deadline = 0.0

    @property
    def stdout(self) -> IO[bytes]:
        return self.process.stdout  # type: ignore[return-value]

    @property
    def fd(self) -> int:
        return self.stdout.fileno()

    def send(self, answer: str, gold: str) -> None:
        self.process.stdin.write(json.dumps([answer, gold]).encode() + b"\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]

    def receive(self) -> str:
        """The worker's next line; EOFError when it died (e.g. a C stack overflow)."""
        line = self.stdout.readline()
        if not line:
            raise EOFError
        return line.decode().strip()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):  # a job left unflushed in a dead worker's stdin
                pipe.close()  # type: ignore[union-attr]


def _kill_all(workers: list[_Worker], owner: int) -> None:
    if os.getpid() != owner:  # a forked child does not own its parent's workers
        return
    for w in workers:
        w.kill()
    workers.clear()


class Verifier:
    """A pool of math-verify workers with a hard per-answer timeout.

    A worker that overruns its timeout (or dies) is killed and replaced, and its answer counts as wrong.
    Workers start in the background (~1 s, sympy); the timeout counts from when a job reaches a ready one.
    Thread-safe; stopped by :meth:`close`, by garbage collection or at interpreter exit.
    """

    def __init__(self, workers: int | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}.")
        self.timeout = timeout
        self._workers = [_Worker() for _ in range(workers or min(8, os.cpu_count() or 1))]
        self._lock = threading.Lock()
        self.pid = os.getpid()
        self._finalizer = weakref.finalize(self, _kill_all, self._workers, self.pid)

    def verify(self, response_or_answer: str, gold: str, *, timeout: float | None = None) -> bool:
        """Whether the answer (the last ``\\boxed{}`` if there is one) equals ``gold``."""
        return self.verify_batch([(response_or_answer, gold)], timeout=timeout)[0]

    def verify_batch(self, pairs: Sequence[tuple[str, str]], *, timeout: float | None = None) -> list[bool]:
        """Score ``(response_or_answer, gold)`` pairs concurrently; each pair gets its own timeout."""
        timeout = self.timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}.")
        results = [False] * len(pairs)
        jobs: deque[tuple[int, str, str]] = deque()
        for i, (response_or_answer, gold) in enumerate(pairs):
            answer, gold = (_answer_of(response_or_answer) or "").strip(), gold.strip()
            verdict = _quick_verdict(answer, gold)
            if verdict is None:
                jobs.append((i, answer, gold))
            else:
                results[i] = verdict
        if jobs:
            with self._lock:
                self._run(jobs, timeout, results)
        return results

    def _run(self, jobs: deque[tuple[int, str, str]], timeout: float, results: list[bool]) -> None:
        if not self._workers:
            raise RuntimeError("Verifier is closed.")
        try:
            while jobs or any(w.job is not None for w in self._workers):
                self._dispatch(jobs, timeout)
                self._collect(results)
        finally:
            for i, w in enumerate(self._workers):
                if w.job is not None:  # interrupted: its late answer must not land in a later batch
                    self._workers[i] = self._replace(w)

    def _dispatch(self, jobs: deque[tuple[int, str, str]], timeout: float) -> None:
        """Give each ready, idle worker a job; its deadline starts now."""
        for i, w in enumerate(self._workers):
            if w.ready and w.job is None and jobs:
                job = jobs.popleft()
                try:
                    w.send(job[1], job[2])
                except OSError:  # it died while idle: not the job's fault, so the job goes back
                    jobs.appendleft(job)
                    self._workers[i] = self._replace(w)
                    continue
                w.job, w.deadline = job[0], time.monotonic() + timeout

    def _collect(self, results: list[bool]) -> None:
        """Wait for the next answer, readiness or deadline; a worker past its deadline is replaced."""
        deadlines = [w.deadline for w in self._workers if w.job is not None]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        awake = set(wait([w.fd for w in self._workers if w.job is not None or not w.ready], wait_s))
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.fd in awake:
                try:
                    message = w.receive()
                except EOFError:
                    if not w.ready:
                        raise RuntimeError("a verifier worker failed to start; see its stderr") from None
                    self._workers[i] = self._replace(w)  # it died on its job: the job stays False
                    continue
                if message == _READY:
                    w.ready = True
                elif w.job is not None:
                    results[w.job] = message == "1"
                    w.job = None
            elif w.job is not None and now >= w.deadline:
                self._workers[i] = self._replace(w)

    @staticmethod
    def _replace(worker: _Worker) -> _Worker:
        worker.kill()
        return _Worker()

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Verifier | None = None
_default_lock = threading.Lock()


def _default_verifier() -> Verifier:
    """The shared pool, started on first use (and, like every Verifier, stopped at interpreter exit)."""
    global _default
    with _default_lock:
        if _default is None or _default.pid != os.getpid():
            _default = Verifier()
        return _default


def verify(response_or_answer: str, gold: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether a response's boxed answer (or a bare answer) equals ``gold``, per math-verify.

    Wrong on timeout, on parse failure and on an empty answer or gold.
    """
    return _default_verifier().verify(response_or_answer, gold, timeout=timeout)


def verify_batch(pairs: Sequence[tuple[str, str]], *, timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    """:func:`verify` over many ``(response_or_answer, gold)`` pairs, scored concurrently."""
    return _default_verifier().verify_batch(pairs, timeout=timeout)


# ---- rewards -----------------------------------------------------------------------------------------


def _example(gold: str | Example) -> Example:
    return gold if isinstance(gold, Example) else Example(question="", answer=gold)


def _correct_batch(
    texts: Sequence[str], golds: Sequence[str | Example], check_fn: AnswerCheck | None, timeout: float
) -> list[bool]:
    """Per response: correct? A response without a ``\\boxed{}`` answer is wrong under the default check."""
    if len(texts) != len(golds):
        raise ValueError(f"got {len(texts)} responses but {len(golds)} gold answers.")
    examples = [_example(g) for g in golds]
    if check_fn is not None:
        return [bool(check_fn(t, e)) for t, e in zip(texts, examples, strict=True)]
    answers = [extract_answer(t) for t in texts]
    return verify_batch(
        [(a or "", e.answer) for a, e in zip(answers, examples, strict=True)], timeout=timeout
    )


def format_penalty(text: str) -> float:
    """The graded format penalty of DESIGN §2: 0.0 for a perfect response, down to -2.0."""
    return check_format(text).penalty


def format_penalty_batch(texts: Sequence[str]) -> list[float]:
    """:func:`format_penalty` per response."""
    return [format_penalty(t) for t in texts]


def accuracy_reward_batch(
    texts: Sequence[str],
    golds: Sequence[str | Example],
    *,
    check: AnswerCheck | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[float]:
    """+1 per correct response, -1 per wrong one."""
    return [1.0 if ok else -1.0 for ok in _correct_batch(texts, golds, check, timeout)]


def accuracy_reward(
    text: str, gold: str | Example, *, check: AnswerCheck | None = None, timeout: float = DEFAULT_TIMEOUT
) -> float:
    """+1 if the response is correct, else -1."""
    return accuracy_reward_batch([text], [gold], check=check, timeout=timeout)[0]


def stage1_reward_batch(
    texts: Sequence[str],
    golds: Sequence[str | Example],
    *,
    check: AnswerCheck | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[float]:
    """NPR-Zero reward (DESIGN §5): empty -2; a format penalty < 0 as is; else ±1 accuracy.

    Only well-formed responses are verified: the others' reward does not depend on correctness.
    """
    if len(texts) != len(golds):
        raise ValueError(f"got {len(texts)} responses but {len(golds)} gold answers.")
    rewards = [EMPTY_RESPONSE_REWARD if not t.strip() else format_penalty(t) for t in texts]
    formed = [i for i, r in enumerate(rewards) if r == 0.0]
    accuracy = accuracy_reward_batch(
        [texts[i] for i in formed], [golds[i] for i in formed], check=check, timeout=timeout
    )
    for i, r in zip(formed, accuracy, strict=True):
        rewards[i] = r
    return rewards


def stage1_reward(
    text: str, gold: str | Example, *, check: AnswerCheck | None = None, timeout: float = DEFAULT_TIMEOUT
) -> float:
    """:func:`stage1_reward_batch` for one response."""
    return stage1_reward_batch([text], [gold], check=check, timeout=timeout)[0]


stage3_reward_batch = accuracy_reward_batch
"""NPR reward (DESIGN §5): ±1 accuracy only; malformed rollouts are dropped before, by the layout."""

stage3_reward = accuracy_reward
"""One-response :data:`stage3_reward_batch`."""
