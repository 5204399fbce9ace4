"""Lab 2.3 helper module, the part for notebooks 03-04: the stress client (one outcome per request, its
own X-Request-Id, every way a request can end) against a scripted SSE server, and the prompt maker."""
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "02-Labs" / "vLLM_Track" / "Lab-2.3-FastAPI_Service"
sys.path.insert(0, str(LAB))

import fastapi_service_helpers as H  # noqa: E402


def _event(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _chunk(text: str) -> bytes:
    return _event({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]})


class ScriptedServer:
    """An aiohttp server on 127.0.0.1 whose /v1/completions answers by the prompt: "ok" (three chunks and
    [DONE]), "error" (a chunk, an error event, [DONE]), "cut" (a chunk, then the connection closes),
    "429", "slow" (a chunk, then 10 s of silence). It records the X-Request-Id of every request."""

    def __init__(self):
        from aiohttp import web

        self.ids: list[str] = []
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request):
        from aiohttp import web

        self.ids.append(request.headers.get("X-Request-Id"))
        body = await request.json()
        kind = body["prompt"]
        if kind == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk("Hi"))
        if kind == "ok":
            await response.write(_chunk(" there") + _chunk("!") + _event("[DONE]"))
        elif kind == "error":
            await response.write(_event({"error": {"message": "the engine died", "code": 503}}) + _event("[DONE]"))
        elif kind == "cut":
            request.transport.close()
            return response
        elif kind == "slow":
            await asyncio.sleep(10)
        await response.write_eof()
        return response

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = ScriptedServer()
    yield s
    s.close()


def test_every_request_ends_in_exactly_one_outcome(server):
    kinds = ["ok", "error", "cut", "429", "ok"]
    outcomes = H.send_requests(server.url, "m", kinds, api_key="k", max_tokens=3, prefix="t", timeout=10)
    assert [o.request_id for o in outcomes] == [f"t-{i:04d}" for i in range(5)]
    assert sorted(server.ids[-5:]) == sorted(o.request_id for o in outcomes)  # sent as X-Request-Id
    by = dict(zip(kinds[:4], outcomes[:4]))
    assert (by["ok"].status, by["ok"].error, by["ok"].done, by["ok"].tokens) == (200, None, True, 3)
    assert (by["error"].status, by["error"].error, by["error"].done) == (200, "error_event", True)
    assert by["error"].detail == "the engine died"
    assert (by["cut"].status, by["cut"].error, by["cut"].done, by["cut"].tokens) == (200, "broken", False, 1)
    assert (by["429"].status, by["429"].error) == (429, None) and "slow down" in by["429"].detail
    for o in outcomes:
        assert o.end is not None and o.end >= o.sent >= 0
        assert (o.ttft is not None) == (o.tokens > 0)


def test_refused_and_timeout(server):
    from inference_course.servers import free_port

    refused = H.send_requests(f"http://127.0.0.1:{free_port()}", "m", ["ok"], api_key=None, max_tokens=1)
    assert (refused[0].status, refused[0].error) == (None, "refused")
    slow = H.send_requests(server.url, "m", ["slow"], api_key=None, max_tokens=1, timeout=0.5)
    assert (slow[0].status, slow[0].error, slow[0].tokens) == (200, "timeout", 1)
    assert slow[0].end < 5


def test_arrivals_are_kept_and_in_flight_can_be_watched(server):
    outcomes = H.send_requests(server.url, "m", ["ok", "ok"], api_key=None, max_tokens=3, arrivals=[0.0, 0.3])
    assert outcomes[1].sent - outcomes[0].sent >= 0.25
    t0 = time.perf_counter()
    flight = H.InFlight(server.url, "m", ["slow", "slow"], api_key=None, max_tokens=1, timeout=1.0, t0=t0)
    assert flight.wait_streaming(2, timeout=5)
    done = flight.wait(timeout=10)
    assert [o.error for o in done] == ["timeout", "timeout"] and flight.streaming() == 0
    frame = H.outcomes_frame(done)
    assert list(frame.request_id) == ["req-0000", "req-0001"] and frame.ttft.notna().all()


class _WordTokenizer:
    """One token per word (enough to check lengths, seeds and prefixes)."""

    def encode(self, text, add_special_tokens=False):
        return [hash(w) % 1000 for w in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_random_text_prompts_are_seeded_and_share_no_prefix():
    tok = _WordTokenizer()
    a = H.random_text_prompts(tok, 4, 16, seed=1)
    assert a == H.random_text_prompts(tok, 4, 16, seed=1)
    assert a != H.random_text_prompts(tok, 4, 16, seed=2)
    assert all(len(p.split()) == 16 for p in a)
    assert len({p.split()[0] + p.split()[1] for p in a}) == 4
