"""The FastAPI app: OpenAI-compatible endpoints over one engine (any backend) driven by a `Scheduler` thread.

Every client error is answered with a 4xx and an OpenAI-style body naming the field at fault; nothing a
client sends can stop the server. A client that goes away has its request cancelled and its cache freed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from npr.data import user_content
from npr.engine import Engine, ParamError, Rollout, SamplingParams
from npr.serve.responses import Reply, sse
from npr.serve.scheduler import Admitted, ChoiceDelta, ChoiceDone, Event, Failed, Job, Prompt, Scheduler
from npr.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    SamplingFields,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "The body is not valid JSON or a field is wrong; `param` names it.",
    },
    405: {"model": ErrorBody, "description": "Wrong HTTP method; the `Allow` header lists the right ones."},
}
"""Error answers the completion endpoints document in the OpenAPI schema."""
POLL_SECONDS = 1.0  # how often a waiting handler checks its client; also the SSE keep-alive period
_REQUEST_FIELD = {"max_new_tokens": "max_tokens"}  # SamplingParams name → request field name
T = TypeVar("T", bound=BaseModel)


def _validation_error(errors: list[Any]) -> ApiError:
    """The first pydantic error as a 400 naming the top-level field (its full location in the message)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if loc and loc[0] in ("body", "query"):  # FastAPI's prefix for where the value came from
        loc = loc[1:]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first['msg']}", code="json_invalid")
    if not loc:
        return ApiError(400, f"the body must be a JSON object: {first['msg']}", code=first["type"])
    return ApiError(400, f"{'.'.join(loc)}: {first['msg']}", param=loc[0], code=first["type"])


async def _parse(request: Request, model: type[T]) -> T:
    """The JSON body as `model`, whatever the Content-Type (curl -d sends form-urlencoded)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the stream ends (done, failed, client gone)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Server:
    """What the routes share: the scheduler, the served name, defaults and limits."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        defaults: Mapping[str, Any],
        format_instruction: bool,
        max_tokens_limit: int,
    ):
        SamplingParams(**defaults)  # a bad default fails at start-up, not at the first request
        self.scheduler = Scheduler(engine)  # replaced by a started one each time the app is served
        self.model_name, self.defaults = model_name, dict(defaults)
        self.format_instruction, self.max_tokens_limit = format_instruction, max_tokens_limit
        self.created = int(time.time())
        self.rejected = 0

    def params(self, req: SamplingFields) -> SamplingParams:
        if req.model is not None and req.model != self.model_name:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if req.max_tokens is not None and req.max_tokens > self.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens must be <= {self.max_tokens_limit}, got {req.max_tokens}.",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        given = {
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            "max_new_tokens": req.max_tokens,
            "max_plans": req.max_plans,
            "stop": (req.stop,) if isinstance(req.stop, str) else req.stop,
        }
        try:
            return SamplingParams(**{**self.defaults, **{k: v for k, v in given.items() if v is not None}})
        except ParamError as e:
            raise ApiError(400, str(e), param=_REQUEST_FIELD.get(e.parameter, e.parameter)) from None

    async def complete(
        self, request: Request, req: SamplingFields, prompts: list[Prompt], reply: Reply
    ) -> Response:
        """Run one request through the scheduler; answer in full or as a stream."""
        mode: Literal["parallel", "sequential"] = "parallel" if req.parallel else "sequential"
        field = "messages" if reply.kind == "chat" else "prompt"
        job = Job(prompts, self.params(req), mode, stream=req.stream, prompt_field=field)
        self.scheduler.submit(job)
        prompt_tokens = await self._admission(job)
        choices = len(prompts) * job.params.n
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            events = self._stream(job, reply, choices, prompt_tokens if usage else None)

            def close() -> None:
                if not job.answered:
                    self.scheduler.cancel(job)

            return _EventStream(events, on_close=close)
        rollouts: dict[int, Rollout] = {}
        while len(rollouts) < choices:
            event = await self._next(job, request)
            if event is None:  # the client went away
                return Response(status_code=499)
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, ChoiceDone):
                rollouts[event.choice] = event.rollout
        job.answered = True
        body = reply.full([rollouts[i] for i in range(choices)], prompt_tokens)
        return JSONResponse(body.model_dump(mode="json"))

    async def _admission(self, job: Job) -> int:
        """Wait until the scheduler took the job; its prompt tokens, or the 4xx it was refused with."""
        event = await self._next(job)
        if isinstance(event, Failed):
            raise event.error
        if not isinstance(event, Admitted):
            raise ApiError(500, f"expected admission, got {event!r}", type="server_error")
        return event.prompt_tokens

    async def _next(self, job: Job, request: Request | None = None) -> Event | None:
        """The job's next event; None (after cancelling the job) once `request`'s client has disconnected."""
        while True:
            event = await job.get(POLL_SECONDS)
            if event is not None:
                return event
            if not self.scheduler.alive:
                raise ApiError(503, "the decoding loop is not running", type="server_error")
            if request is not None and await request.is_disconnected():
                self.scheduler.cancel(job)
                return None

    async def _stream(
        self, job: Job, reply: Reply, choices: int, prompt_tokens: int | None
    ) -> AsyncIterator[str]:
        for i in range(choices):
            if (start := reply.start(i)) is not None:
                yield start
        rollouts: list[Rollout] = []
        while len(rollouts) < choices:
            event = await job.get(POLL_SECONDS)
            if event is None:
                yield ": keep-alive\n\n"  # also how a dead connection is noticed between tokens
            elif isinstance(event, Failed):
                job.answered = True
                yield sse(event.error.body())
                break
            elif isinstance(event, ChoiceDelta):
                yield reply.delta(event.choice, event.text, event.branch)
            elif isinstance(event, ChoiceDone):
                rollouts.append(event.rollout)
                yield reply.done(event.choice, event.rollout)
        job.answered = True
        if prompt_tokens is not None and len(rollouts) == choices:
            yield reply.usage_chunk(reply.usage(prompt_tokens, rollouts))
        yield "data: [DONE]\n\n"

    def metrics(self) -> dict[str, int | float]:
        return {**self.scheduler.metrics(), "requests_rejected_total": self.rejected}


def _prometheus(metrics: Mapping[str, int | float]) -> str:
    lines = []
    for key, value in metrics.items():
        lines += [
            f"# TYPE npr_{key} {'counter' if key.endswith('_total') else 'gauge'}",
            f"npr_{key} {value}",
        ]
    return "\n".join(lines) + "\n"


def _chat_prompt(server: _Server, req: ChatCompletionRequest) -> list[Prompt]:
    """The conversation; a served model is trained already, so the format instruction is opt-in (it goes
    after the last user message, as in training prompts)."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if server.format_instruction if req.format_instruction is None else req.format_instruction:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ApiError(400, "messages: the format instruction needs a user message", param="messages")
        last = messages[users[-1]]
        last["content"] = user_content(last["content"], parallel=req.parallel)
    return [messages]


def _text_prompts(req: CompletionRequest) -> list[Prompt]:
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    if not p:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return list(p)  # type: ignore[arg-type]


def create_app(
    engine: Engine,
    *,
    model_name: str = "npr",
    sampling_defaults: Mapping[str, Any] | None = None,
    format_instruction: bool = False,
    max_tokens_limit: int | None = None,
) -> FastAPI:
    """The server app. `sampling_defaults` are SamplingParams fields used when a request leaves them out
    (tests pass `logits_processors` here); `max_tokens_limit` defaults to the model's context length."""
    server = _Server(
        engine,
        model_name,
        sampling_defaults or {},
        format_instruction,
        max_tokens_limit or engine.max_positions,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if server.scheduler.alive:
            raise RuntimeError("this app is already being served: one engine takes one decoding loop")
        server.scheduler = Scheduler(engine)  # fresh each time, so an app can be served again after a stop
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="npr", summary="Native parallel reasoning, OpenAI-compatible.", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        if 400 <= e.status < 500:
            server.rejected += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        body = ApiError(e.status_code, str(e.detail)).body()
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)  # a 405 keeps its Allow

    # Bodies are parsed by hand (any Content-Type, OpenAI-style errors); the schema still declares them.
    @app.post("/v1/chat/completions", responses=ERRORS, openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        return await server.complete(request, req, _chat_prompt(server, req), Reply("chat", model_name))

    @app.post("/v1/completions", responses=ERRORS, openapi_extra=_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        return await server.complete(request, req, _text_prompts(req), Reply("text", model_name))

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=model_name, created=server.created, max_model_len=engine.max_positions)
        return ModelList(data=[card])

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.scheduler.alive
        return JSONResponse({"status": "ok" if alive else "down"}, status_code=200 if alive else 503)

    @app.get("/metrics", response_model=None)
    async def metrics(format: Literal["json", "prometheus"] = "json") -> JSONResponse | PlainTextResponse:
        if format == "prometheus":
            return PlainTextResponse(_prometheus(server.metrics()))
        return JSONResponse(server.metrics())

    app.openapi = lambda: _openapi(app, (ChatCompletionRequest, CompletionRequest))  # type: ignore[method-assign]
    return app


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI `requestBody` naming `model`'s schema (added to the components by `_openapi`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi(app: FastAPI, bodies: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """FastAPI's schema plus the request body models the routes refer to."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in bodies:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema
