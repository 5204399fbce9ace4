"""The service's drain on SIGTERM, timed, without an engine: the service runs as a gateway (architecture
(b)) in front of a stand-in for ``vllm serve`` that streams one token every 0.1 s. Cheap enough to
measure what the engine tests cannot afford: a stream that outlives the drain, and a second signal. (A
drain that ends because every stream finished is tested on the engine, in test_service.py.)"""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from inference_course import servers
from inference_course.models import resolve_model

KEY = "sk-test-drain-77c1"
TICK_S = 0.1

FAKE_VLLM = '''
"""A stand-in for `vllm serve`: /v1/models, /health, and /v1/completions streaming " tick" every TICK_S."""
import asyncio, json
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": "smollm2", "object": "model", "max_model_len": 4096}]}


@app.get("/health")
def health():
    return {}


@app.post("/v1/completions")
async def completions(body: dict):
    def chunk(text, finish):
        return "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "smollm2",
                                      "choices": [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": finish}]}) + "\\n\\n"

    async def events():
        n = body["max_tokens"]
        for i in range(n):
            yield chunk(" tick", "length" if i == n - 1 else None)
            await asyncio.sleep(TICK_S)
        yield "data: [DONE]\\n\\n"

    return StreamingResponse(events(), media_type="text/event-stream")
'''


@pytest.fixture
def fake_vllm(tmp_path):
    (tmp_path / "fake_vllm.py").write_text(FAKE_VLLM.replace("TICK_S", repr(TICK_S)))
    with servers.uvicorn_server("fake_vllm:app", app_dir=tmp_path, ready_path="/health") as upstream:
        yield upstream


def _gateway(upstream, drain_timeout_s: float):
    return servers.service_server(resolve_model(), upstream=upstream.url, keys={"t": KEY},
                                  drain_timeout_s=drain_timeout_s)


def _stream(gateway, ticks: int, received: list, done: threading.Event):
    """Read a streamed completion of ``ticks`` tokens; ``received`` gets each token, then 'END' or the error."""
    try:
        with httpx.stream("POST", gateway.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "smollm2", "prompt": "x", "max_tokens": ticks, "stream": True},
                          timeout=120, trust_env=False) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: {"):
                    received.append("tick")
            received.append("END")
    except httpx.HTTPError as exc:
        received.append(f"error: {type(exc).__name__}")
    finally:
        done.set()


def _access_log(server) -> list[dict]:
    import json

    return [json.loads(line) for line in server.log_path.read_text(errors="replace").splitlines()
            if line.startswith('{"ts"')]


def _stream_then_signal(gateway, ticks: int):
    received, done = [], threading.Event()
    thread = threading.Thread(target=_stream, args=(gateway, ticks, received, done), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(received) < 3:
        assert time.monotonic() < deadline and not done.is_set(), received
        time.sleep(0.02)
    os.kill(gateway.pid, signal.SIGTERM)
    return received, done, time.monotonic()


def test_a_stream_longer_than_the_drain_is_cut_at_the_drain_timeout(fake_vllm):
    drain = 8.0
    with _gateway(fake_vllm, drain_timeout_s=drain) as gateway:
        received, done, signalled = _stream_then_signal(gateway, ticks=1200)  # about 2 minutes of stream
        gateway.process.wait(drain + 60)
        exited = time.monotonic() - signalled
        assert done.wait(10)
    assert received[-1] != "END" and received.count("tick") < 1200, received[-3:]
    # The drain waits drain_timeout_s, then the service stops: not another drain_timeout_s on top.
    assert drain - 0.5 <= exited < 1.5 * drain, f"exit {exited:.1f} s after SIGTERM with a {drain:g} s drain"
    cut = [line for line in _access_log(gateway) if line["path"] == "/v1/completions"]
    assert [(line["status"], line["reason"]) for line in cut] == [(200, "shutdown")]  # its one line, and why


def test_a_second_sigterm_stops_at_once(fake_vllm):
    drain = 60.0
    with _gateway(fake_vllm, drain_timeout_s=drain) as gateway:
        received, done, signalled = _stream_then_signal(gateway, ticks=1200)
        time.sleep(1)
        os.kill(gateway.pid, signal.SIGTERM)
        gateway.process.wait(drain + 60)
        exited = time.monotonic() - signalled
        assert done.wait(10)
    assert received[-1] != "END"
    cut = [line for line in _access_log(gateway) if line["path"] == "/v1/completions"]
    assert [(line["status"], line["reason"]) for line in cut] == [(200, "shutdown")]
    assert exited < drain / 3, f"exit {exited:.1f} s after the first SIGTERM; the second one should stop at once"
