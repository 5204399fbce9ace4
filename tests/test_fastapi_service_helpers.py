"""Lab 2.3 helper module (notebooks 01-02 part) and the hello_app teaching toy, without an engine."""
import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

LAB = Path(__file__).resolve().parents[1] / "02-Labs" / "vLLM_Track" / "Lab-2.3-FastAPI_Service"
sys.path.insert(0, str(LAB))

import fastapi_service_helpers as H  # noqa: E402


def test_chunk_kind_names_every_part_of_a_chat_stream():
    def chunk(delta, finish=None):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    assert H.chunk_kind(chunk({"role": "assistant", "content": ""})) == "role"
    assert H.chunk_kind(chunk({"content": "Paris"})) == "text"
    assert H.chunk_kind(chunk({}, "stop")) == "finish"
    assert H.chunk_kind({"choices": [], "usage": {"total_tokens": 3}}) == "usage"
    assert H.chunk_kind({"error": {"message": "cut"}}) == "error"
    assert H.chunk_kind("[DONE]") == "done"


def test_openapi_routes_keeps_parameterless_operations_and_the_doc_pages():
    spec = {"paths": {
        "/health": {"get": {}},
        "/v1/chat/completions": {"post": {"requestBody": {}}},
        "/v1/responses/{response_id}": {"get": {"parameters": [{"name": "response_id"}]}},
        "/search": {"get": {"parameters": [{"name": "q", "in": "query"}]}},
        "/v1/models": {"get": {}, "delete": {}},
    }}
    routes = H.openapi_routes(spec)
    assert ("GET", "/health") in routes and ("POST", "/v1/chat/completions") in routes
    assert ("GET", "/openapi.json") in routes and ("GET", "/docs") in routes
    assert not any("{" in path or path == "/search" for _, path in routes)
    assert ("DELETE", "/v1/models") not in routes
    assert routes == sorted(routes, key=lambda r: (r[1], r[0]))


def _guarded_app(request: httpx.Request) -> httpx.Response:
    if request.url.path.startswith("/v1") and request.headers.get("authorization") != "Bearer k":
        return httpx.Response(401)
    return httpx.Response(200, text="ok")


def test_auth_matrix_asks_with_and_without_the_key_and_skips_posts_without_a_body():
    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(_guarded_app))
    routes = [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/other")]
    table = H.auth_matrix(client, "k", routes, {"/v1/completions": {"prompt": "Hi"}})
    assert table["route"].tolist() == ["/health", "/v1/models", "/v1/completions"]
    assert table["no key"].tolist() == [200, 401, 401] and table["with key"].tolist() == [200, 200, 200]


def test_status_ledger_counts_by_the_service_route_labels():
    ledger = H.StatusLedger()
    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(_guarded_app), event_hooks=ledger.hooks)
    client.get("/v1/models")
    client.get("/v1/models", headers={"Authorization": "Bearer k"})
    client.get("/docs")
    assert ledger.counts == {("/v1/models", 401): 1, ("/v1/models", 200): 1, ("other", 200): 1}

    async def run():
        async with httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(_guarded_app),
                                     event_hooks=ledger.async_hooks) as ac:
            await ac.post("/v1/completions", json={})

    asyncio.run(run())
    assert ledger.counts[("/v1/completions", 401)] == 1


def test_scrape_and_metric_sum_matching_samples():
    text = ('# TYPE service_requests counter\n'
            'service_requests_total{route="/v1/completions",code="200"} 3.0\n'
            'service_requests_total{route="/v1/completions",code="429"} 2.0\n'
            'service_requests_total{route="/metrics",code="200"} 1.0\n'
            '# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n')
    client = httpx.Client(base_url="http://x", transport=httpx.MockTransport(lambda r: httpx.Response(200, text=text)))
    samples = H.scrape(client)
    assert H.metric(samples, "service_requests_total", route="/v1/completions") == 5.0
    assert H.metric(samples, "service_requests_total", code=200) == 4.0
    assert H.metric(samples, "vllm:num_requests_running") == 1.0
    assert H.metric(samples, "absent_total") == 0.0


def test_send_on_schedule_sends_on_time_without_waiting_for_answers():
    async def slow(i):
        await asyncio.sleep(0.2)
        return i

    async def run():
        return await H.send_on_schedule([0.0, 0.05, 0.1], slow)

    results = asyncio.run(run())
    assert [r for _, r in results] == [0, 1, 2]
    sent = [s for s, _ in results]
    assert sent[2] < 0.18, "the third request waited for earlier answers"
    assert all(b >= a for a, b in zip(sent, sent[1:]))


def test_access_log_keeps_only_the_json_request_lines(tmp_path):
    log = tmp_path / "service.log"
    lines = ["INFO starting", json.dumps({"request_id": "a", "status": 200}), "{not json",
             json.dumps({"event": "other"}), json.dumps({"request_id": "b", "status": 429})]
    log.write_text("\n".join(lines) + "\n")
    assert [e["request_id"] for e in H.access_log(log)] == ["a", "b"]
    assert H.access_log(log, ["b"]) == [{"request_id": "b", "status": 429}]


def test_engine_has_arg_reads_the_installed_vllm():
    pytest.importorskip("vllm")
    assert H.engine_has_arg("max_model_len")
    assert not H.engine_has_arg("no_such_engine_argument")


def test_hello_app_and_recording_transport_on_a_real_uvicorn():
    from inference_course.servers import uvicorn_server

    with uvicorn_server("hello_app:app", app_dir=LAB, ready_path="/") as server:
        recorder = H.RecordingTransport()
        with httpx.Client(base_url=server.url, transport=recorder) as client:
            assert client.get("/", params={"name": "x"}).json() == {"message": "hello, x"}
            with client.stream("GET", "/count", params={"n": 2, "delay_s": 0}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                reads = H.timed_reads(response)
        body = b"".join(data for _, data in reads)
        assert body == bytes(recorder.bodies[-1])
        assert body == b': ping\n\ndata: {"i": 1, "of": 2}\n\ndata: {"i": 2, "of": 2}\n\ndata: [DONE]\n\n'
        assert [t for t, _ in reads] == sorted(t for t, _ in reads)
