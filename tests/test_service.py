"""The service on the real engine, architecture (a): vLLM's AsyncLLM inside the service's process, driven
by the official openai client. Answers, streaming, the error statuses, client disconnects, per-request
timeouts, schemathesis, overload, the engine's death and a restart, and the drain on SIGTERM.

One service for the whole module (an engine start costs 40-90 s on a 2-core CI machine); the test that
kills the engine restarts it, and the last test ends it with SIGTERM. Tests run in file order."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import warnings

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference_course import servers
from inference_course.models import resolve_model
from inference_course.profiles import get_profile
from test_service_policy import fuzz_openapi

pytestmark = pytest.mark.engine

P = get_profile()
ENGINE = P.serving_engine_kwargs()
NAME = "smollm2"
KEYS = {tenant: f"sk-test-{tenant}-4f9a" for tenant in ("alice", "bob", "burst", "load", "fuzz1", "fuzz2", "fuzz3")}
MAX_IN_FLIGHT = 4
RATE = 20              # requests/s per tenant (and the burst): no other test comes near it
TIMEOUT_S = 20.0       # per request: every other test's requests end well within it
DRAIN_S = 60.0
BODY_LIMIT = 256 * 1024
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": NAME, "messages": FRANCE, "max_tokens": 8}


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def sdk(server, tenant: str = "alice", cls=openai.OpenAI):
    """The official client; no retries, so that every 429/503 is seen as it was answered."""
    return cls(base_url=server.url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def post(server, path: str, body, tenant: str | None = "alice", **kw) -> httpx.Response:
    headers = {**(auth(tenant) if tenant else {}), **kw.pop("headers", {})}
    kw.setdefault("timeout", 120)
    return httpx.post(server.url + path, json=body, headers=headers, trust_env=False, **kw)


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    """Sum of the samples called ``name`` (with these labels) on ``url``/metrics."""
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=30, trust_env=False).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def service_metric(server, name: str, **labels) -> float:
    return metric(server.url, name, auth("alice"), **labels)


def access_log(server) -> list[dict]:
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith('{"ts"'):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def log_lines_for(server, request_id: str) -> list[dict]:
    return [line for line in access_log(server) if line["request_id"] == request_id]


def wait_until(predicate, seconds: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(poll)


@pytest.fixture(scope="module")
def service():
    server = servers.service_server(
        resolve_model(), keys=KEYS, served_name=NAME, rate_limit=RATE, rate_burst=RATE,
        max_in_flight=MAX_IN_FLIGHT, request_timeout_s=TIMEOUT_S, drain_timeout_s=DRAIN_S,
        max_body_bytes=BODY_LIMIT, max_num_seqs=MAX_IN_FLIGHT, **ENGINE)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def max_model_len(service) -> int:
    return sdk(service).models.list().data[0].model_extra["max_model_len"]


def test_openai_client_answers_streams_and_reports_usage(service):
    client = sdk(service)
    assert [m.id for m in client.models.list().data] == [NAME]
    chat = client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=16)
    answer = chat.choices[0].message.content
    assert "Paris" in answer
    chunks = list(client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3, "the answer did not stream"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == chat.choices[0].finish_reason

    whole = client.completions.create(model=NAME, prompt="One, two, three,", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model=NAME, prompt="One, two, three,", max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert pieces[-1].usage.completion_tokens == 12


def test_async_openai_client_runs_requests_side_by_side(service):
    async def main():
        client = sdk(service, "bob", openai.AsyncOpenAI)

        async def streamed_chat():
            stream = await client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=16,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(
                streamed_chat(),
                client.chat.completions.create(model=NAME, messages=FRANCE, temperature=0, max_tokens=16),
                client.completions.create(model=NAME, prompt="Hello", max_tokens=10, extra_body={"ignore_eos": True}))
        finally:
            await client.close()

    streamed, chat, text = asyncio.run(main())
    assert "Paris" in streamed and "Paris" in chat.choices[0].message.content
    assert text.usage.completion_tokens == 10 and text.choices[0].finish_reason == "length"


def test_error_statuses_on_the_real_service(service, max_model_len):
    assert httpx.get(service.url + "/health", trust_env=False).json() == {"status": "ok"}
    assert httpx.get(service.url + "/ready", trust_env=False).json() == {"status": "ready"}
    for tenant_headers in ({}, {"Authorization": "Bearer sk-test-nobody"}):
        answer = post(service, "/v1/chat/completions", CHAT, tenant=None, headers=tenant_headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    client = sdk(service)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=f"context of {max_model_len} tokens"):
        client.chat.completions.create(model=NAME, messages=FRANCE, max_tokens=max_model_len)
    answer = post(service, "/v1/chat/completions", {**CHAT, "temperature": "0.5"})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "temperature"
    answer = post(service, "/v1/completions", {"model": NAME, "prompt": "Hi", "n": 2})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "n"
    big = {**CHAT, "messages": [{"role": "user", "content": "y" * BODY_LIMIT}]}
    assert post(service, "/v1/chat/completions", big).status_code == 413
    answer = post(service, "/v1/completions", {"model": NAME, "prompt": [1, 10**7]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    assert httpx.get(service.url + "/v1/models", headers=auth("alice"), trust_env=False).status_code == 200


def test_rate_limit_429_with_a_retry_after_that_lets_the_client_in(service):
    async def batch(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=service.url, headers=auth("burst"), timeout=60, trust_env=False,
                                     limits=limits) as client:
            # An empty body passes the rate limiter and is then refused (422): no engine work.
            return await asyncio.gather(*[client.post("/v1/completions", json={}) for _ in range(n)])

    started, answers = time.monotonic(), []
    for _ in range(5):  # until the bucket is seen empty; one batch is enough unless the machine stalls
        answers += asyncio.run(batch(100))
        if any(a.status_code == 429 for a in answers):
            break
    elapsed = time.monotonic() - started
    codes = [a.status_code for a in answers]
    assert set(codes) <= {422, 429, 503}, codes
    refused = [a for a in answers if a.status_code == 429]
    assert refused, f"no 429 in {len(codes)} requests"
    # A token bucket lets through at most its burst plus what it refilled meanwhile.
    assert len(codes) - len(refused) <= RATE + RATE * elapsed + 1
    assert all(a.json()["error"]["type"] == "rate_limit_exceeded" for a in refused)
    retry_after = max(int(a.headers["retry-after"]) for a in refused)
    assert 1 <= retry_after <= 60
    assert post(service, "/v1/chat/completions", CHAT, tenant="alice").status_code == 200  # others unaffected
    time.sleep(retry_after)
    assert post(service, "/v1/completions", {}, tenant="burst").status_code == 422  # let in after Retry-After


def test_disconnect_aborts_the_engine_request(service, max_model_len):
    generated = lambda: service_metric(service, "vllm:generation_tokens_total")  # noqa: E731
    running = lambda: service_metric(service, "vllm:num_requests_running")  # noqa: E731
    long = max_model_len - 64
    # vllm:num_requests_running is set from the scheduler's stats as engine steps come back, which can lag the
    # first chunks on a busy 2-core machine: wait for it rather than read it once. Once in CI (2026-11-30) it
    # stayed 0 for 20 s with the stream open, cause unknown: that attempt is reported (tokens generated, the
    # access log, the service log) and the scenario runs once more; the checks below hold for the attempt
    # whose request was seen running.
    failures = []
    for attempt in (1, 2):
        request_id = f"disconnect-1-{attempt}"
        before = generated()
        stream = sdk(service).completions.create(
            model=NAME, prompt="Count to one thousand:", max_tokens=long, stream=True, extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Id": request_id})
        received = 0
        for _ in stream:
            received += 1
            if received == 3:
                break
        assert received == 3, f"the stream ended after {received} chunks, before the client could leave it"
        try:
            wait_until(lambda: running() >= 1, 20, "vllm:num_requests_running >= 1 while the stream is open")
            break
        except AssertionError as error:
            tail = "\n".join(service.log_path.read_text(errors="replace").splitlines()[-15:])
            failures.append(f"attempt {attempt}: {error}; {generated() - before:g} tokens generated since the "
                            f"request; its access-log lines: {log_lines_for(service, request_id)}; the service "
                            f"log ends:\n{tail}")
            stream.close()
            wait_until(lambda: running() == 0, 20, "vllm:num_requests_running at 0 before the next attempt")
    else:
        raise AssertionError("\n\n".join(failures))
    if failures:
        warnings.warn("test_disconnect_aborts_the_engine_request needed a second attempt:\n" + failures[0])
    stream.close()
    wait_until(lambda: running() == 0, 20, "vllm:num_requests_running back to 0 after the client left")
    settled = generated()
    time.sleep(2)
    assert generated() == settled, "the engine kept generating for a client that left"
    assert settled - before < long / 2
    line = wait_until(lambda: log_lines_for(service, request_id), 10, "the access-log line")
    assert [(x["status"], x["reason"]) for x in line] == [(499, "client_gone")]

    # Without streaming: the client gives up waiting (a read timeout closes its connection).
    before = generated()
    with pytest.raises(httpx.ReadTimeout):
        post(service, "/v1/completions", {"model": NAME, "prompt": "Count:", "max_tokens": long, "ignore_eos": True},
             headers={"X-Request-Id": "disconnect-2"}, timeout=httpx.Timeout(60, read=3))
    wait_until(lambda: running() == 0, 20, "the abandoned non-streamed request aborted")
    settled = generated()
    time.sleep(2)
    assert generated() == settled and settled - before < long / 2
    line = wait_until(lambda: log_lines_for(service, "disconnect-2"), 10, "the access-log line")
    assert [(x["status"], x["reason"]) for x in line] == [(499, "client_gone")]
    assert service_metric(service, "service_requests_in_flight") == 0


def test_request_timeout_is_504_or_an_error_event(service, max_model_len):
    long = max_model_len - 64
    started = time.monotonic()
    probe = sdk(service).completions.create(model=NAME, prompt="Count:", max_tokens=32,
                                            extra_body={"ignore_eos": True})
    per_token = (time.monotonic() - started) / probe.usage.completion_tokens
    if per_token * long < 2 * TIMEOUT_S:
        pytest.skip(f"{long} tokens take about {per_token * long:.0f} s here: too fast to reach the "
                    f"{TIMEOUT_S:g} s timeout")
    outcome = {}

    def streamed():
        try:
            stream = sdk(service).completions.create(model=NAME, prompt="Count:", max_tokens=long, stream=True,
                                                     extra_body={"ignore_eos": True})
            outcome["chunks"] = sum(1 for _ in stream)
            outcome["error"] = None
        except openai.APIError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=streamed, daemon=True)
    thread.start()
    started = time.monotonic()
    answer = post(service, "/v1/chat/completions", {**CHAT, "max_tokens": long, "ignore_eos": True},
                  headers={"X-Request-Id": "timeout-1"})
    waited = time.monotonic() - started
    thread.join(TIMEOUT_S + 60)
    assert answer.status_code == 504 and answer.json()["error"]["type"] == "timeout"
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + 30
    assert not thread.is_alive(), "the stream did not end after its timeout"
    assert outcome["error"] and "longer than" in outcome["error"], outcome
    wait_until(lambda: service_metric(service, "vllm:num_requests_running") == 0, 20,
               "timed-out requests aborted in the engine")
    assert [x["reason"] for x in log_lines_for(service, "timeout-1")] == ["timeout"]


def test_schemathesis_on_the_real_service(service):
    statuses, failures = fuzz_openapi(service.url, [auth(t) for t in ("fuzz1", "fuzz2", "fuzz3")], NAME, examples=20)
    assert failures == [], "\n\n".join(failures)
    for route in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert statuses.get((route, "positive", 200), 0) >= 5, statuses  # the engine answered fuzzed requests
    assert httpx.get(service.url + "/health", trust_env=False).status_code == 200
    assert httpx.get(service.url + "/ready", trust_env=False).status_code == 200
    assert service_metric(service, "service_requests_in_flight") == 0


def test_overload_every_request_gets_one_answer(service):
    n, tokens = 2 * MAX_IN_FLIGHT, 32
    route = "/v1/chat/completions"
    before = {code: service_metric(service, "service_requests_total", route=route, code=code)
              for code in ("200", "429", "503")}
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int):
        client = sdk(service, "load")
        ask = dict(model=NAME, messages=FRANCE, max_tokens=tokens, extra_body={"ignore_eos": True},
                   extra_headers={"X-Request-Id": f"overload-{i}"})
        barrier.wait()
        try:
            if i % 2:
                chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                results[i] = (200, chunks[-1].usage.completion_tokens, finish)
            else:
                chat = client.chat.completions.create(**ask)
                results[i] = (200, chat.usage.completion_tokens, [chat.choices[0].finish_reason])
        except openai.APIStatusError as exc:
            results[i] = (exc.status_code, exc.response.headers.get("retry-after"), exc.body)
        except Exception as exc:  # noqa: BLE001 - any other outcome is a failure, reported below
            results[i] = ("exception", repr(exc), None)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S + 90)
    assert all(r is not None for r in results), f"requests without an answer: {results}"
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 429, 503}, results
    assert codes.count(200) >= MAX_IN_FLIGHT and codes.count(503) >= 1, codes
    for code, count, finish in results:
        if code == 200:
            assert count == tokens and finish == ["length"]
        else:
            assert count == "1"  # Retry-After
    for code in ("200", "429", "503"):
        moved = service_metric(service, "service_requests_total", route=route, code=code) - before[code]
        assert moved == codes.count(int(code)), (code, moved, codes)
    for i, code in enumerate(codes):
        assert [x["status"] for x in log_lines_for(service, f"overload-{i}")] == [code]
    assert service_metric(service, "service_requests_in_flight") == 0
    assert "Paris" in sdk(service).chat.completions.create(model=NAME, messages=FRANCE, temperature=0,
                                                           max_tokens=16).choices[0].message.content


def _engine_core(server) -> psutil.Process:
    cores = [p for p in psutil.Process(server.pid).children(recursive=True)
             if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1, cores
    return cores[0]


def test_engine_death_is_seen_and_a_restart_recovers(service, max_model_len):
    core = _engine_core(service)
    outcome, streaming = {}, threading.Event()

    def stream():
        try:
            chunks = sdk(service).completions.create(model=NAME, prompt="Count:", max_tokens=max_model_len - 64,
                                                     stream=True, extra_body={"ignore_eos": True})
            received = 0
            for _ in chunks:
                received += 1
                if received == 3:
                    streaming.set()
            outcome["end"] = ("finished", received)
        except openai.APIError as exc:
            outcome["end"] = ("error", str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken stream is an acceptable end too
            outcome["end"] = ("broken", repr(exc))
        finally:
            streaming.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert streaming.wait(60) and "end" not in outcome, outcome
    core.kill()  # SIGKILL
    thread.join(60)
    assert not thread.is_alive(), "the stream hung after the engine died"
    assert outcome["end"][0] in ("error", "broken"), outcome  # never a normal end of a cut answer

    started = time.monotonic()
    answer = post(service, "/v1/chat/completions", CHAT)
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "service_unavailable"
    assert time.monotonic() - started < 30
    ready = httpx.get(service.url + "/ready", trust_env=False)
    health = httpx.get(service.url + "/health", trust_env=False)
    assert (ready.status_code, ready.json()) == (503, {"status": "dead"})
    assert (health.status_code, health.json()) == (503, {"status": "dead"})
    assert service_metric(service, "service_ready") == 0

    group = service.pid
    service.stop()
    assert servers.group_members(group) == [], "engine processes outlived the dead service's stop()"
    service.start()
    service.wait_ready()
    assert "Paris" in sdk(service).chat.completions.create(model=NAME, messages=FRANCE, temperature=0,
                                                           max_tokens=16).choices[0].message.content


def test_sigterm_drains_the_streams_in_flight_then_exits(service):
    # Long enough that no stream can end before the last one has started (32 tokens did on a fast CI machine:
    # the first two streams were done before SIGTERM), short enough for the drain on 2 cores.
    k, tokens = 3, 96
    results: list = [None] * k
    first_chunk = [threading.Event() for _ in range(k)]

    def stream(i: int):
        try:
            chunks = []
            for chunk in sdk(service).chat.completions.create(
                    model=NAME, messages=FRANCE, max_tokens=tokens, stream=True, extra_body={"ignore_eos": True},
                    stream_options={"include_usage": True}, extra_headers={"X-Request-Id": f"drain-{i}"}):
                chunks.append(chunk)
                first_chunk[i].set()
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            results[i] = ("done", chunks[-1].usage.completion_tokens, finish)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = ("exception", repr(exc), None)
        finally:
            first_chunk[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(k)]
    for thread in threads:
        thread.start()
    for event in first_chunk:
        assert event.wait(60)
    # Which streams are in flight at SIGTERM is the scheduler's business: once (project CI, stream 0's first
    # chunk came after streams 1 and 2 had ended) two of three were already done. The drain is tested on the
    # streams still open; every stream, open or not, must end whole.
    in_flight = [i for i in range(k) if results[i] is None]
    assert in_flight, f"every stream ended before SIGTERM, nothing left to drain: {results}"
    if len(in_flight) < k:
        warnings.warn(f"only streams {in_flight} of {k} were in flight at SIGTERM: {results}")
    group = service.pid
    os.kill(service.pid, signal.SIGTERM)  # the service's process only, as the kubelet does
    signalled = time.monotonic()

    ready, newcomer = [], None
    while service.process.poll() is None and time.monotonic() - signalled < DRAIN_S + 60:
        try:
            ready.append(httpx.get(service.url + "/ready", timeout=5, trust_env=False).status_code)
        except httpx.TransportError:
            ready.append("refused")
        if newcomer is None:
            try:
                answer = post(service, "/v1/chat/completions", CHAT, timeout=30, headers={"X-Request-Id": "drain-new"})
                newcomer = (answer.status_code, answer.headers.get("connection"), answer.json()["error"]["type"])
            except httpx.TransportError:
                newcomer = "refused"
        time.sleep(0.2)
    exited_after = time.monotonic() - signalled
    service.process.wait(30)
    for thread in threads:
        thread.join(30)
    assert results == [("done", tokens, ["length"])] * k, (in_flight, results)  # nothing dropped, every answer whole
    assert newcomer in ((503, "close", "service_unavailable"), "refused"), newcomer
    assert ready and set(ready) <= {503, "refused"}, ready
    assert exited_after <= DRAIN_S + 60, exited_after
    for i in range(k):
        assert [x["status"] for x in log_lines_for(service, f"drain-{i}")] == [200]
    if newcomer != "refused":
        assert [(x["status"], x["reason"]) for x in log_lines_for(service, "drain-new")] == [(503, "draining")]
    wait_until(lambda: servers.group_members(group) == [], 30, "the engine's processes exit with the service")
    log = service.log_path.read_text(errors="replace")  # both runs of the service, every request above
    assert log.count('"tenant": "fuzz') > 20 and not [key for key in KEYS.values() if key in log]
