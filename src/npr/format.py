"""The Map–Process–Reduce response grammar: the only module that knows the tag strings."""

from __future__ import annotations

from dataclasses import dataclass

TAGS: tuple[str, ...] = (
    "<guideline>",
    "</guideline>",
    "<plan>",
    "</plan>",
    "<step>",
    "</step>",
    "<takeaway>",
    "</takeaway>",
)


@dataclass(frozen=True)
class TagIds:
    """Token ids of the 8 tag tokens (each tag is one special token)."""

    guideline_open: int
    guideline_close: int
    plan_open: int
    plan_close: int
    step_open: int
    step_close: int
    takeaway_open: int
    takeaway_close: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TagIds:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in TAGS]
        return cls(*ids)
