"""Sampling parameters and finish reasons, named as in vLLM/OpenAI where the meaning is the same."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import torch

from npr.format import MAX_PLANS

Mode = Literal["parallel", "sequential"]
"""`parallel` forks at every `</guideline>`; `sequential` decodes the same format as one causal stream."""

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""`fn(token_ids, logits) -> logits`: token_ids are the ids the decoding row can see (prompt + response,
canonical order; siblings excluded), logits is `[vocab]` float32."""


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens, max_path_tokens or the model's context ran out mid-decoding
    BUDGET = "budget"  # a fork was refused: its reserve did not fit the remaining budget
    INVALID_FORK = "invalid_fork"  # guideline with 0 plans or more than max_plans
    INVALID_STRUCTURE = "invalid_structure"  # a tag where the grammar forbids it (nested, </step> in trunk…)
    CANCELLED = "cancelled"  # the caller withdrew the request
    ERROR = "error"  # a caller-supplied callable (a logits processor) raised; stop_reason says what


class ParamError(ValueError):
    """A sampling parameter out of range; names the parameter and the value."""

    def __init__(self, parameter: str, value: object, rule: str):
        super().__init__(f"{parameter} {rule}, got {value!r}.")
        self.parameter, self.value = parameter, value


@dataclass
class SamplingParams:
    n: int = 1
    """Samples per prompt. Must be >= 1."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy. Must be >= 0."""
    top_p: float = 1.0
    """Nucleus sampling mass. Must be in (0, 1]; 1 is off."""
    top_k: int = 0
    """Keep the k most likely tokens. 0 is off."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens alone or in any batch. Sample i uses seed + i."""
    max_new_tokens: int = 512
    """Budget over ALL generated tokens of all branches (a global ledger, forced tokens included)."""
    max_path_tokens: int | None = None
    """Bound on the critical path (response positions); None = max_new_tokens."""
    max_plans: int = MAX_PLANS
    """Largest fork the engine accepts; a guideline with more plans ends the request (invalid_fork)."""
    branch_repetition_penalty: float = 1.02
    """Repetition penalty applied only while decoding inside a step (1.0 is off). Not vLLM's
    repetition_penalty, which applies everywhere."""
    fork_reserve: int = 4
    """Tokens each branch must be able to spend beyond its forced prefix for a fork to be accepted."""
    stop: Sequence[str] = ()
    """Stop strings, checked on the trunk text; the text is cut before the stop string."""
    stop_on_violation: bool | None = None
    """End a request at the first grammar violation. None: yes in parallel mode (it cannot continue), no in
    sequential mode (stage 1 needs the whole text to grade it)."""
    logits_processors: Sequence[LogitsProcessor] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("max_path_tokens", self.max_path_tokens is None or self.max_path_tokens >= 1, "must be >= 1"),
            ("max_plans", self.max_plans >= 1, "must be >= 1"),
            ("branch_repetition_penalty", self.branch_repetition_penalty > 0, "must be > 0"),
            ("fork_reserve", self.fork_reserve >= 1, "must be >= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ParamError(name, getattr(self, name), rule)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ParamError("stop", self.stop, "must not contain empty strings")

    @property
    def path_limit(self) -> int:
        return self.max_new_tokens if self.max_path_tokens is None else self.max_path_tokens
