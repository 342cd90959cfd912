"""Request and response bodies of the OpenAI-compatible API, plus npr's extension fields.

Requests are validated strictly (a string where a number belongs is an error, not a conversion) and unknown
fields are ignored, as OpenAI clients send many optional ones. Fields mean what they mean in the OpenAI API,
except `max_tokens`, which is npr's global ledger over all branches of an answer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # OpenAI's bound on `n`
MAX_STOP = 4  # OpenAI's bound on the number of stop strings


class ApiError(Exception):
    """An error answered with an OpenAI-style body; `param` names the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """What every 4xx/5xx answer carries (OpenAI's error shape)."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk with `usage` (and no choices) before `[DONE]`."""


class SamplingFields(_Request):
    """Fields shared by both completion endpoints; None takes the server's default."""

    model: str | None = None
    """The served model's id (see /v1/models); None means the served model."""
    max_tokens: int | None = Field(None, ge=1)
    """Budget over ALL generated tokens of all branches (npr's global ledger), at most the server's limit."""
    max_plans: int | None = Field(None, ge=1)
    """Largest fork accepted; a guideline with more plans ends the answer (finish `invalid_fork`)."""
    parallel: bool = True
    """Decode branches in parallel (native); False decodes the same format sequentially."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    """Same seed, same answer, whatever else the server is decoding. Sample i of n uses seed + i."""
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    format_instruction: bool | None = None
    """Append npr's format instruction to the last user message (None: the server's setting)."""


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    """A text, several texts, token ids, or several lists of token ids (sent as they are: no template)."""


# ---------------------------------------------------------------------------------------------- responses


class BranchRef(BaseModel):
    """Which parallel branch a streamed delta belongs to (the chunk's `npr` field; null for the trunk)."""

    block: int  # 0-based block of this answer
    branch: int  # 0-based branch within the block
    plan_id: str


class BranchInfo(BaseModel):
    plan_id: str
    start: int  # index of the branch's <step> among the response tokens (canonical order)
    length: int
    finished: bool


class BlockInfo(BaseModel):
    guideline_position: int
    takeaway_position: int | None
    branches: list[BranchInfo]


class NprResult(BaseModel):
    """npr's account of one answer (the choice's `npr_result` field)."""

    finish_reason: str  # npr's own: stop, length, budget, invalid_fork, invalid_structure
    stop_reason: str | None
    answer: str | None
    total_tokens: int
    critical_path_tokens: int
    forks: int
    branches: int
    wall_time: float
    blocks: list[BlockInfo]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # every generated token of every branch
    total_tokens: int


class Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: Message
    finish_reason: str
    logprobs: None = None
    npr_result: NprResult


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None
    npr_result: NprResult


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None
    npr: BranchRef | None = None
    npr_result: NprResult | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None
    npr: BranchRef | None = None
    npr_result: NprResult | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "npr"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
