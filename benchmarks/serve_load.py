"""Load test of `npr serve` on loopback: N concurrent clients for a bounded time against the tiny model.

The server runs in its own process (so clients and server do not share a GIL), with the test script that
makes the random tiny model fork twice per answer (3 branches, then 2). Half the clients stream, half do
not. Every response is checked: HTTP 200, finish "stop", both forks present, the answer boxed. Prints the
machine and requests/s, generated tokens/s, p50/p99 latency; exits 1 on any error or incomplete answer.

    .venv/bin/python benchmarks/serve_load.py --clients 32 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LENS = [[2, 5, 3], [4, 1]]


def serve(port: int, max_batch_requests: int) -> None:
    """The server process: tiny model, forced forks, uvicorn on loopback."""
    sys.path.insert(0, str(ROOT))  # tests.scripted: the processor that makes the random model fork on cue
    import uvicorn

    from npr.engine import ParallelEngine
    from npr.model import tiny_model
    from npr.serve import create_app
    from tests.scripted import Script

    model, tok = tiny_model(seed=0)
    engine = ParallelEngine(model, tok, max_batch_requests=max_batch_requests)
    app = create_app(engine, model_name="tiny", sampling_defaults={"logits_processors": [Script(tok, LENS)]})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def check(choice: dict) -> str | None:
    """Why an answer is not complete, or None."""
    result = choice.get("npr_result") or {}
    if choice.get("finish_reason") != "stop" or result.get("finish_reason") != "stop":
        return f"finish {choice.get('finish_reason')} / {result.get('finish_reason')}"
    if (result.get("forks"), result.get("branches"), result.get("answer")) != (2, 5, "5"):
        return f"structure {result.get('forks')} forks, {result.get('branches')} branches, {result.get('answer')}"
    return None


async def one_request(http: httpx.AsyncClient, body: dict, tally: Tally) -> None:
    start = time.perf_counter()
    try:
        if body["stream"]:
            chunks, done = [], False
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    tally.errors.append(f"HTTP {r.status_code}")
                    return
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunks.append(json.loads(line[6:]))
            finals = [c for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
            problem = (
                "no [DONE]" if not done else ("no final chunk" if len(finals) != 1 else check(finals[0]))
            )
            usage = chunks[-1].get("usage") or {}
        else:
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                tally.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            payload = r.json()
            problem, usage = check(payload["choices"][0]), payload["usage"]
    except httpx.HTTPError as e:
        tally.errors.append(f"{type(e).__name__}: {e}")
        return
    if problem:
        tally.errors.append(problem)
        return
    tally.latencies.append(time.perf_counter() - start)
    tally.tokens += usage.get("completion_tokens", 0)


async def client(i: int, url: str, deadline: float, max_tokens: int, tally: Tally) -> None:
    stream = i % 2 == 0
    options = {"stream_options": {"include_usage": True}} if stream else {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        k = 0
        while time.perf_counter() < deadline:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"client {i} asks question {k}: what is 2+3?"}],
                "seed": 1000 * i + k,
                "max_tokens": max_tokens,
                "stream": stream,
                **options,
            }
            await one_request(http, body, tally)
            k += 1


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> tuple[Tally, float]:
    tally = Tally()
    start = time.perf_counter()
    await asyncio.gather(*(client(i, url, start + seconds, max_tokens, tally) for i in range(clients)))
    return tally, time.perf_counter() - start


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not become healthy in {timeout:.0f} s")


def machine() -> str:
    import torch

    return (
        f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
        f"load avg {os.getloadavg()[0]:.1f} · Python {platform.python_version()} · torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) · device cpu"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (half stream)")
    ap.add_argument("--seconds", type=float, default=20.0, help="clients start no request after this")
    ap.add_argument("--max-tokens", type=int, default=300, help="budget per answer (an answer needs ~110)")
    ap.add_argument("--max-batch-requests", type=int, default=64, help="the engine's live-sample bound")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = mp.get_context("spawn").Process(target=serve, args=(port, args.max_batch_requests), daemon=True)
    server.start()
    try:
        wait_healthy(url)
        tally, wall = asyncio.run(load(url, args.clients, args.seconds, args.max_tokens))
        metrics = httpx.get(f"{url}/metrics").json()
    finally:
        server.terminate()
        server.join(10)

    done = len(tally.latencies)
    lat = sorted(tally.latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    print(f"machine: {machine()}")
    print(
        f"load:    {args.clients} clients on loopback for {args.seconds:.0f} s (+ drain), tiny model, forks 3+2"
    )
    print(f"done:    {done} complete answers, {len(tally.errors)} errors/incomplete, wall {wall:.1f} s")
    print(f"rate:    {done / wall:.2f} requests/s, {tally.tokens / wall:.0f} generated tokens/s")
    if lat:
        print(f"latency: p50 {statistics.median(lat):.2f} s, p99 {p99:.2f} s, max {lat[-1]:.2f} s")
    print(
        f"server:  {metrics['requests_finished_total']} finished, {metrics['requests_cancelled_total']} cancelled, "
        f"{metrics['forks_total']} forks, {metrics['branches_total']} branches, {metrics['steps_total']} steps, "
        f"{metrics['generated_tokens_total'] / max(metrics['steps_total'], 1):.1f} tokens/step"
    )
    for e in sorted(set(tally.errors))[:10]:
        print(f"error:   {e} (x{tally.errors.count(e)})")
    if tally.errors or not done:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
