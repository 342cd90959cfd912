"""`Example`: one problem with its gold answer, the unit every loader, task, trainer and evaluation shares.

It lives on its own so that `npr.data` (loaders, prompts) and `npr.tasks` (our generators and verifiers) can
both use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One problem: its question, its gold answer (a string), an id, and whatever else the source carries."""

    question: str
    answer: str
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
