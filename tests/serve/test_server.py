"""The OpenAI-compatible server, in-process (TestClient) and over loopback (uvicorn + httpx): forced forks in
full and streamed answers, 4xx for every kind of bad input, continuous batching, cancellation on disconnect."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from npr.data import build_prompt, encode_messages
from npr.engine import ParallelEngine
from npr.format import PLAN, TagIds, parse
from npr.model import tiny_model
from npr.serve import create_app
from npr.serve.stream import Detokenizer
from tests.conftest import BACKENDS, assert_no_leak, make_engine
from tests.scripted import Script

LENS = [[2, 5, 3], [4, 1]]  # two forks: 3 branches, then 2
CHAT = {"messages": [{"role": "user", "content": "What is 2+3?"}], "seed": 7, "max_tokens": 300}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def make_app(tiny, processor, engine=None, **options):
    model, tok = tiny
    defaults = {"logits_processors": [processor]}
    engine = engine or ParallelEngine(model, tok)
    return create_app(engine, model_name="tiny", sampling_defaults=defaults, **options)


@pytest.fixture(scope="module", params=BACKENDS)
def client(request, tiny):
    """The same API on every backend: our engine, and llama.cpp on the tiny model's GGUF export."""
    gguf = request.getfixturevalue("tiny_gguf") if request.param == "llamacpp" else None
    engine = make_engine(request.param, *tiny, gguf)
    with TestClient(make_app(tiny, Script(tiny[1], LENS), engine)) as c:
        yield c
    assert_no_leak(engine)


def test_openapi_declares_the_bodies_and_errors(client):
    spec = client.get("/openapi.json").json()
    for path, model in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ]:
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"400", "405"} <= set(op["responses"])
        assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"][
            "properties"
        ] or path.endswith("/completions")
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and wrong.json()["error"]["message"]


def endless(tokenizer):
    """Free text that never ends by itself: tags and end-of-sequence banned (runs until cancelled)."""
    banned = [*TagIds.from_tokenizer(tokenizer).as_tuple(), tokenizer.eos_token_id]

    def processor(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[banned] = float("-inf")
        return logits

    return processor


@contextmanager
def served(app) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def sse_payloads(lines: Iterator[str]) -> list[dict | str]:
    """The `data:` payloads of an SSE stream, JSON-decoded except the final [DONE]."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assemble(chunks: list[dict]) -> str:
    """Canonical text from streamed deltas: trunk text, and each block's branches in branch order."""
    parts: list[str | dict[int, str]] = []
    blocks: dict[int, dict[int, str]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            text = c["delta"].get("content") if "delta" in c else c["text"]
            if not text:
                continue
            ref = c["npr"]
            if ref is None:
                if parts and isinstance(parts[-1], str):
                    parts[-1] += text
                else:
                    parts.append(text)
                continue
            if ref["block"] not in blocks:
                blocks[ref["block"]] = {}
                parts.append(blocks[ref["block"]])
            branches = blocks[ref["block"]]
            branches[ref["branch"]] = branches.get(ref["branch"], "") + text
    return "".join(p if isinstance(p, str) else "".join(p[k] for k in sorted(p)) for p in parts)


def check_forked_choice(choice: dict) -> None:
    result = choice["npr_result"]
    assert choice["finish_reason"] == "stop" and result["finish_reason"] == "stop"
    assert (result["forks"], result["branches"]) == (2, 5)
    assert [len(b["branches"]) for b in result["blocks"]] == [3, 2]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert parse(text).answer == result["answer"] == "5"


# ---------------------------------------------------------------------------------------------- in-process


def test_chat_completion_forks(client):
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    check_forked_choice(choice)
    assert body["usage"]["completion_tokens"] == choice["npr_result"]["total_tokens"]
    assert body["usage"]["prompt_tokens"] > 0


def test_stream_carries_branches_and_matches_the_full_answer(client):
    full = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [p for p in payloads[:-1] if isinstance(p, dict)]
    usage_chunk, chunks = chunks[-1], chunks[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["npr_result"] == full["npr_result"] | {
        "wall_time": last["npr_result"]["wall_time"]
    }
    assert assemble(chunks) == full["message"]["content"]
    refs = [c["choices"][0]["npr"] for c in chunks if c["choices"][0]["npr"]]
    assert {(x["block"], x["branch"], x["plan_id"]) for x in refs} == {
        (0, 0, "1"),
        (0, 1, "2"),
        (0, 2, "3"),
        (1, 0, "1"),
        (1, 1, "2"),
    }
    # Branches of a block are decoded side by side: branch 1 speaks before branch 0 has finished.
    order = [(x["block"], x["branch"]) for x in refs]
    assert order.index((0, 1)) < len(order) - 1 - order[::-1].index((0, 0))


def test_stop_string_cuts_full_and_streamed_text_alike(client):
    body = {**CHAT, "stop": ["part 2"]}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert full["npr_result"]["stop_reason"] == "part 2" and full["finish_reason"] == "stop"
    assert full["message"]["content"].endswith(f"{PLAN}2: do ")  # the script's plan text, cut
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [p for p in sse_payloads(r.iter_lines()) if isinstance(p, dict)]
    assert assemble(chunks) == full["message"]["content"]


def test_completions_several_prompts_and_samples(client, tiny):
    body = {"prompt": ["1+1=", "2+2="], "n": 2, "seed": 3, "max_tokens": 300, "model": "tiny"}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        check_forked_choice(c)
    assert choices[0]["text"] != choices[1]["text"]  # sample 1 uses seed + 1
    # The same prompt as token ids, with the same seed, gives the same samples.
    ids = tiny[1]("1+1=", add_special_tokens=False)["input_ids"]
    again = client.post("/v1/completions", json={**body, "prompt": ids}).json()["choices"]
    assert [c["text"] for c in again] == [c["text"] for c in choices[:2]]


def test_format_instruction_is_opt_in_and_matches_the_training_prompt(client, tiny):
    def prompt_tokens(**extra) -> int:
        body = {**CHAT, "max_tokens": 60, **extra}
        return client.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]

    question = CHAT["messages"][0]["content"]
    assert prompt_tokens() == len(encode_messages(tiny[1], CHAT["messages"]))
    assert prompt_tokens(format_instruction=True) == len(build_prompt(tiny[1], question))
    assert prompt_tokens(format_instruction=True, parallel=False) == len(
        build_prompt(tiny[1], question, parallel=False)
    )


def test_models_health_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny" and card["max_model_len"] == 4096
    m = client.get("/metrics").json()
    assert m["requests_total"] >= 1 and m["forks_total"] >= 2 and m["branches_total"] >= 5
    assert m["generated_tokens_total"] > 0 and m["requests_running"] == 0
    text = client.get("/metrics", params={"format": "prometheus"}).text
    assert "# TYPE npr_requests_total counter" in text and "npr_kv_slots 0" in text


LONG = " ".join(["word"] * 5000)
BAD = [
    ("chat", "{not json", 400, None, "json_invalid"),
    ("chat", "[1, 2]", 400, None, "model_type"),
    ("chat", {"messages": []}, 400, "messages", "too_short"),
    ("chat", {"model": "tiny"}, 400, "messages", "missing"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "literal_error"),
    ("chat", {"messages": "hi"}, 400, "messages", "list_type"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, "temperature", "float_type"),
    ("chat", {**CHAT, "temperature": 5}, 400, "temperature", "less_than_equal"),
    ("chat", {**CHAT, "n": 1.5}, 400, "n", "int_type"),
    ("chat", {**CHAT, "max_tokens": -5}, 400, "max_tokens", "greater_than_equal"),
    ("chat", {**CHAT, "max_tokens": 10**9}, 400, "max_tokens", "max_tokens_too_large"),
    ("chat", {**CHAT, "stop": [""]}, 400, "stop", None),  # SamplingParams' own check (ParamError)
    ("chat", {**CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("chat", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    (
        "chat",
        {"messages": [{"role": "system", "content": "x"}], "format_instruction": True},
        400,
        "messages",
        None,
    ),
    ("text", {"prompt": ""}, 400, "prompt", None),
    ("text", {"prompt": []}, 400, "prompt", None),
    ("text", {"prompt": [[1, 2], "mixed"]}, 400, "prompt", "string_type"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "param", "code"), BAD)
def test_bad_input_gets_a_4xx_naming_the_field(client, endpoint, body, status, param, code):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    before = client.get("/metrics").json()["requests_rejected_total"]
    r = client.post(path, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert client.get("/metrics").json()["requests_rejected_total"] == before + 1
    assert client.get("/health").json() == {"status": "ok"}


def test_a_chat_template_that_refuses_the_messages_is_a_400():
    model, tok = tiny_model(seed=0)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with TestClient(make_app((model, tok), Script(tok, LENS))) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "roles must alternate" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "1+1=", "max_tokens": 300}).status_code == 200


def test_tag_ids_in_a_token_prompt_are_refused(client, tiny):
    tag = TagIds.from_tokenizer(tiny[1]).step_open
    r = client.post("/v1/completions", json={"prompt": [5, tag, 6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "tag" in r.json()["error"]["message"]


def test_unknown_route_answers_in_the_same_error_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = client.get("/metrics", params={"format": "xml"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"


def test_detokenizer_never_splits_a_character(tiny):
    tok = tiny[1]
    text = "é→😀 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    pieces = [d.push([i]) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# ---------------------------------------------------------------------------------------------- loopback


def test_loopback_full_and_streamed_chat_and_batching(tiny):
    with served(make_app(tiny, Script(tiny[1], LENS))) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        check_forked_choice(r.json()["choices"][0])
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            chunks = [p for p in sse_payloads(s.iter_lines()) if isinstance(p, dict)]
        assert assemble(chunks) == r.json()["choices"][0]["message"]["content"]

        # Requests that arrive together are decoded in one batch: far fewer steps than one after another.
        steps = http.get("/metrics").json()["steps_total"]
        http.post("/v1/chat/completions", json=CHAT)
        alone = http.get("/metrics").json()["steps_total"] - steps
        with ThreadPoolExecutor(4) as pool:
            seeds = [{**CHAT, "seed": s} for s in range(4)]
            answers = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), seeds))
        together = http.get("/metrics").json()["steps_total"] - steps - alone
        assert all(a.status_code == 200 for a in answers)
        assert together < 2 * alone, (together, alone)


def wait_for(http: httpx.Client, ok, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = http.get("/metrics").json()
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_a_client_that_leaves_has_its_request_cancelled_and_cache_freed(tiny):
    app = make_app(tiny, endless(tiny[1]))
    body = {"messages": [{"role": "user", "content": "talk forever"}], "max_tokens": 4000}
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = s.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(5), strict=False) if line) >= 1  # decoding started
            live = http.get("/metrics").json()
            assert (live["requests_running"], live["samples_running"]) == (1, 1) and live["kv_slots"] > 0
        m = wait_for(http, lambda m: m["requests_cancelled_total"] == 1 and m["samples_running"] == 0)
        assert m["requests_cancelled_total"] == 1 and m["requests_running"] == 0
        assert m["samples_running"] == 0 and m["kv_slots"] == m["kv_bytes"] == 0
        assert 0 < m["generated_tokens_total"] < 4000

        with pytest.raises(httpx.ReadTimeout):  # a full (non-streamed) request whose client gives up
            http.post("/v1/chat/completions", json=body, timeout=0.5)
        m = wait_for(http, lambda m: m["requests_cancelled_total"] == 2 and m["samples_running"] == 0)
        assert (m["requests_cancelled_total"], m["requests_running"], m["kv_slots"]) == (2, 0, 0)
        assert m["requests_finished_total"] == 0


def test_an_engine_failure_fails_the_live_requests_not_the_server(tiny):
    script, calls = Script(tiny[1], LENS), []

    def breaks_once(visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("processor blew up")
        return script(visible, logits)

    with TestClient(make_app(tiny, breaks_once)) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "processor blew up" in r.json()["error"]["message"]
        check_forked_choice(c.post("/v1/chat/completions", json=CHAT).json()["choices"][0])
        m = c.get("/metrics").json()
        assert (m["requests_failed_total"], m["requests_finished_total"], m["kv_slots"]) == (1, 1, 0)


def test_cli_serve_builds_the_app(monkeypatch):
    import npr.cli.serve  # noqa: F401  (registers `npr serve`)
    from npr.cli import app as cli

    served_apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served_apps.append((app, kw)))
    result = CliRunner().invoke(cli, ["serve", "--model", "tiny", "--port", "8123", "--instruction"])
    assert result.exit_code == 0, result.output
    ((server, options),) = served_apps
    assert options == {"host": "127.0.0.1", "port": 8123, "log_level": "info"}
    assert server.state.server.format_instruction is True
    with TestClient(server) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
    bad = CliRunner().invoke(cli, ["serve", "--model", "tiny", "--dtype", "float8"])
    assert bad.exit_code == 2 and "float8" in bad.output
