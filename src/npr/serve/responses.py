"""Rollouts → OpenAI response objects and server-sent-event chunks, for both endpoints.

`finish_reason` keeps OpenAI's values where one fits (a refused fork is a token-budget stop: "length");
npr's own reason, with the branch tree and stats, goes in the choice's `npr_result`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from npr.engine import FinishReason, Rollout
from npr.serve.schemas import (
    BlockInfo,
    BranchInfo,
    BranchRef,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    Delta,
    Message,
    NprResult,
    Usage,
)

_OPENAI_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.BUDGET: "length"}


def finish_reason(rollout: Rollout) -> str:
    return _OPENAI_FINISH.get(rollout.finish_reason, rollout.finish_reason.value)


def npr_result(rollout: Rollout) -> NprResult:
    s = rollout.stats
    blocks = [
        BlockInfo(
            guideline_position=b.guideline_position,
            takeaway_position=b.takeaway_position,
            branches=[
                BranchInfo(plan_id=x.plan_id, start=x.start, length=x.length, finished=x.finished)
                for x in b.branches
            ],
        )
        for b in rollout.blocks
    ]
    return NprResult(
        finish_reason=rollout.finish_reason.value,
        stop_reason=rollout.stop_reason,
        answer=rollout.answer,
        total_tokens=s.total_tokens,
        critical_path_tokens=s.critical_path_tokens,
        forks=s.forks,
        branches=s.branches,
        wall_time=s.wall_time,
        blocks=blocks,
    )


def sse(payload: BaseModel | dict | str) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


@dataclass
class Reply:
    """Shapes one request's answers as a chat or a text completion (same data, two OpenAI shapes)."""

    kind: Literal["chat", "text"]
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self) -> dict[str, object]:
        return {"id": self.id, "created": self.created, "model": self.model}

    def usage(self, prompt_tokens: int, rollouts: list[Rollout]) -> Usage:
        completion = sum(r.stats.total_tokens for r in rollouts)
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
        )

    def full(self, rollouts: list[Rollout], prompt_tokens: int) -> ChatCompletion | Completion:
        """The non-streaming response; `rollouts` in choice order."""
        head = {**self._head(), "usage": self.usage(prompt_tokens, rollouts)}
        if self.kind == "chat":
            chat = [
                ChatChoice(
                    index=i,
                    message=Message(content=r.text),
                    finish_reason=finish_reason(r),
                    npr_result=npr_result(r),
                )
                for i, r in enumerate(rollouts)
            ]
            return ChatCompletion.model_validate({**head, "choices": chat})
        text = [
            CompletionChoice(index=i, text=r.text, finish_reason=finish_reason(r), npr_result=npr_result(r))
            for i, r in enumerate(rollouts)
        ]
        return Completion.model_validate({**head, "choices": text})

    def _chunk(self, choices: list, usage: Usage | None = None) -> ChatCompletionChunk | CompletionChunk:
        head = {**self._head(), "usage": usage, "choices": choices}
        if self.kind == "chat":
            return ChatCompletionChunk.model_validate(head)
        return CompletionChunk.model_validate(head)

    def start(self, choice: int) -> str | None:
        """The chat stream's first chunk of a choice names the role (text completions have none)."""
        if self.kind != "chat":
            return None
        return sse(self._chunk([ChatChunkChoice(index=choice, delta=Delta(role="assistant", content=""))]))

    def delta(self, choice: int, text: str, branch: BranchRef | None) -> str:
        if self.kind == "chat":
            return sse(self._chunk([ChatChunkChoice(index=choice, delta=Delta(content=text), npr=branch)]))
        return sse(self._chunk([CompletionChunkChoice(index=choice, text=text, npr=branch)]))

    def done(self, choice: int, rollout: Rollout) -> str:
        reason, result = finish_reason(rollout), npr_result(rollout)
        if self.kind == "chat":
            last = ChatChunkChoice(index=choice, delta=Delta(), finish_reason=reason, npr_result=result)
            return sse(self._chunk([last]))
        return sse(
            self._chunk(
                [CompletionChunkChoice(index=choice, text="", finish_reason=reason, npr_result=result)]
            )
        )

    def usage_chunk(self, usage: Usage) -> str:
        return sse(self._chunk([], usage))
