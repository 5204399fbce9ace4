"""inference_course.service without an engine: the policies (keys, rate limits, admission), the wire
models, the SSE chunks (parsed by the official openai SDK), and the app's policy paths in front of a
test double of the backend (``ScriptedBackend``). The real engine is in test_service.py."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from inference_course.service import ServiceConfig, create_app
from inference_course.service.backends import EngineDead, stream_error
from inference_course.service.policy import (Admission, KeyRing, RateLimiter, TokenBucket, parse_keys,
                                             retry_after_header)
from inference_course.service.wire import ChatRequest, ChunkWriter, CompletionRequest, Delta

KEYS = {"sk-alpha-0123456789": "alpha", "sk-beta-9876543210": "beta"}
ALPHA = {"Authorization": "Bearer sk-alpha-0123456789"}
BETA = {"Authorization": "Bearer sk-beta-9876543210"}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


# -- policy.KeyRing and parse_keys ------------------------------------------------------------------

def test_keyring_names_the_tenant_of_a_valid_bearer_key():
    ring = KeyRing(KEYS)
    assert ring.enabled
    assert ring.tenant("Bearer sk-alpha-0123456789") == "alpha"
    assert ring.tenant("bearer sk-beta-9876543210") == "beta"  # the scheme is case-insensitive
    assert ring.tenant("Bearer  sk-alpha-0123456789 ") == "alpha"  # surrounding blanks are not part of a key


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "sk-alpha-0123456789", "Basic sk-alpha-0123456789", "Token sk-alpha-0123456789",
    "Bearer sk-alpha-012345678", "Bearer sk-alpha-01234567890", "Bearer SK-ALPHA-0123456789", "Bearer alpha"])
def test_keyring_refuses_missing_malformed_and_unknown_keys(header):
    assert KeyRing(KEYS).tenant(header) is None


def test_keyring_without_keys_lets_everyone_in_as_anonymous():
    ring = KeyRing({})
    assert not ring.enabled
    assert ring.tenant(None) == "anonymous" and ring.tenant("Bearer whatever") == "anonymous"


def test_keys_never_show_in_a_repr():
    ring = KeyRing(KEYS)
    config = ServiceConfig(model="m", api_keys=dict(KEYS), upstream_api_key="sk-upstream-secret")
    for text in (repr(ring), str(vars(ring)), repr(config), str(config)):
        for secret in (*KEYS, "sk-upstream-secret"):
            assert secret not in text, f"{secret} shows in {text[:120]}"


def test_parse_keys_reads_tenant_key_pairs():
    assert parse_keys(None) == {} and parse_keys("") == {} and parse_keys(" , ") == {}
    assert parse_keys("alpha:sk-1, beta : sk-2 ,") == {"sk-1": "alpha", "sk-2": "beta"}
    assert parse_keys("alpha:sk:with:colons") == {"sk:with:colons": "alpha"}
    assert parse_keys("alpha:sk-1,alpha:sk-2") == {"sk-1": "alpha", "sk-2": "alpha"}  # a tenant may hold two keys


@pytest.mark.parametrize("spec", ["sk-bare-secret", "alpha:", ":sk-bare-secret", "alpha:sk-1,sk-bare-secret",
                                  "alpha:sk-bare-secret,beta:sk-bare-secret"])
def test_parse_keys_refuses_malformed_entries_without_echoing_a_key(spec):
    with pytest.raises(ValueError) as error:
        parse_keys(spec)
    assert "sk-bare-secret" not in str(error.value)
    assert "entry" in str(error.value)


# -- policy.TokenBucket, RateLimiter, Admission (fake clock) ------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_accepts_a_burst_then_refills_at_its_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    # (arrival time, expected answer of take(): 0 = accepted, else seconds until the next token)
    script = [(0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0.5),   # the burst, then empty: one token in 1/2 s
              (0.25, 0.25),                              # half a token refilled: a quarter second to go
              (0.5, 0), (0.5, 0.5),                       # one whole token: taken; empty again
              (1.0, 0),                                  # one more token after 0.5 s at 2/s
              (60.0, 0), (60.0, 0), (60.0, 0), (60.0, 0.5)]  # a long pause refills to the burst, no more
    answers = []
    for at, _ in script:
        clock.now = 100.0 + at
        answers.append(bucket.take())
    assert answers == pytest.approx([expected for _, expected in script])


def test_rate_limiter_keeps_one_bucket_per_tenant_and_none_means_unlimited():
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    assert [limiter.retry_after("a") for _ in range(3)] == pytest.approx([0, 0, 1.0])
    assert [limiter.retry_after("b") for _ in range(2)] == [0, 0]  # b has its own burst
    clock.now += 0.25
    assert limiter.retry_after("a") == pytest.approx(0.75)
    unlimited = RateLimiter(rate=None, burst=1, clock=clock)
    assert all(unlimited.retry_after("a") == 0 for _ in range(1000))


def test_retry_after_header_rounds_up_to_whole_seconds():
    assert [retry_after_header(s) for s in (0.001, 0.5, 1.0, 1.01, 29.9)] == ["1", "1", "1", "2", "30"]


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, 0)])
def test_token_bucket_refuses_nonsense(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_admission_caps_requests_in_flight():
    gate = Admission(2)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter() and gate.in_flight == 2
    gate.leave()
    assert gate.try_enter() and gate.in_flight == 2
    open_gate = Admission(None)
    assert all(open_gate.try_enter() for _ in range(500))
    with pytest.raises(ValueError):
        Admission(0)


# -- wire: request models ---------------------------------------------------------------------------

def _chat(**fields):
    return ChatRequest.model_validate({**CHAT, **fields})


@pytest.mark.parametrize("fields", [
    {"temperature": "0.5"}, {"temperature": True}, {"temperature": 2.01}, {"temperature": -0.1},
    {"top_p": 0}, {"top_p": 1.5}, {"presence_penalty": -2.5}, {"frequency_penalty": 3},
    {"n": 2}, {"n": 0}, {"max_tokens": 0}, {"max_tokens": "8"}, {"max_completion_tokens": 1.5},
    {"stream": "true"}, {"stop": ""}, {"stop": ["a", ""]}, {"stop": ["a", "b", "c", "d", "e"]},
    {"seed": 2**63}, {"seed": -(2**63) - 1}, {"seed": 2**53}, {"seed": -(2**53)}, {"seed": 1.5}, {"seed": "1"}, {"max_tokens": 8.5},
    {"messages": []}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": []}]}, {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": None},
])
def test_chat_request_refuses_what_it_should(fields):
    with pytest.raises(ValidationError):
        _chat(**fields)


def test_chat_request_accepts_the_openai_shapes():
    req = _chat(temperature=0, top_p=1, seed=-(2**53 - 1), stop="\n", unknown_field={"a": 1},
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                                       {"type": "text", "text": "world"}]}])
    assert req.temperature == 0.0 and isinstance(req.temperature, float)  # an integer is a number
    assert req.messages[1].text() == "Hello, world"
    assert req.stops() == ["\n"] and _chat(stop=["a", "b"]).stops() == ["a", "b"] and _chat().stops() == []
    assert _chat(max_tokens=5, max_completion_tokens=7).requested_tokens() == 7
    assert ChatRequest.model_validate({**CHAT, "max_tokens": None}).requested_tokens() is None


def test_completion_request_prompt_and_defaults():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Once"})
    assert req.max_tokens == 16 and req.n == 1 and not req.stream
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    for prompt in ("", [], [1, "2"], [1, True], None, 5):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": prompt})


def test_json_schema_publishes_the_bounds():
    props = ChatRequest.model_json_schema()["properties"]
    assert (props["temperature"]["minimum"], props["temperature"]["maximum"]) == (0, 2)
    assert (props["top_p"]["exclusiveMinimum"], props["top_p"]["maximum"]) == (0, 1)
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (1, 1)
    assert props["messages"]["minItems"] == 1
    seed = props["seed"]["anyOf"][0]  # bounds a JSON reader with doubles holds exactly
    assert float(seed["maximum"]) == seed["maximum"] and float(seed["minimum"]) == seed["minimum"]


# -- wire: chunks, read by the official openai SDK ---------------------------------------------------

def _events(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n")
    blocks = raw.decode().split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


def test_chat_chunks_parse_as_openai_chat_completion_chunks():
    writer = ChunkWriter("chat", "req-1", "smollm2", prompt_tokens=5, include_usage=True)
    raw = (writer.opening() + writer.add(Delta("Hel", 1)) + writer.add(Delta("", 1)) +
           writer.add(Delta("lo", 1)) + writer.add(Delta("", 1, "length")) + writer.closing())
    events = _events(raw)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert {c.id for c in chunks} == {"chatcmpl-req-1"} and {c.model for c in chunks} == {"smollm2"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, None, "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == {
        "prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
        "completion_tokens_details": None, "prompt_tokens_details": None}
    assert all(c.usage is None for c in chunks[:-1])
    whole = ChatCompletion.model_validate(writer.response())
    assert whole.choices[0].message.content == "Hello" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 4


def test_completion_chunks_parse_as_openai_completions_and_usage_is_optional():
    writer = ChunkWriter("completion", "req-2", "smollm2", prompt_tokens=3)
    assert writer.opening() == b""
    raw = writer.add(Delta(" one", 1)) + writer.add(Delta(" two", 1, "stop")) + writer.closing()
    events = _events(raw)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])
    # The SDK's Completion type has no null finish_reason; its stream reader (like vLLM's server) has.
    chunks = list(_sdk_over(raw).completions.create(model="smollm2", prompt="x", stream=True))
    assert all(isinstance(c, Completion) for c in chunks) and {c.id for c in chunks} == {"cmpl-req-2"}
    assert "".join(c.choices[0].text for c in chunks) == " one two"
    assert [c.choices[0].finish_reason for c in chunks] == [None, "stop"]
    whole = Completion.model_validate(writer.response())
    assert whole.choices[0].text == " one two" and whole.usage.total_tokens == 5 and whole.id == "cmpl-req-2"


def _sdk_over(raw: bytes) -> openai.OpenAI:
    """An openai client whose every answer is the server-sent events ``raw``."""
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, content=raw, headers={"content-type": "text/event-stream"}))
    return openai.OpenAI(base_url="http://test/v1", api_key="k", max_retries=0,
                         http_client=httpx.Client(transport=transport))


def test_the_sdk_reads_our_stream_and_raises_on_an_error_event():
    writer = ChunkWriter("chat", "r", "smollm2", prompt_tokens=2, include_usage=True)
    good = writer.opening() + writer.add(Delta("Hi", 1, "stop")) + writer.closing()
    stream = _sdk_over(good).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    assert chunks[-1].usage.completion_tokens == 1
    cut = writer.opening() + writer.add(Delta("Hi", 1)) + stream_error("the engine died", "service_unavailable", 503)
    stream = _sdk_over(cut).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                                     stream=True)
    with pytest.raises(openai.APIError, match="the engine died"):
        list(stream)


# -- the app, in front of a test double -------------------------------------------------------------

class ScriptedBackend:
    """Test double of the service's backend (no engine): answers ``words``, one token each. Clear
    ``gate`` to hold requests inside the backend; ``fail`` makes the next requests raise it."""

    def __init__(self, words=("Hello", " there", "!"), state="ready", kind="engine", max_model_len=128):
        self.words, self.state, self.kind, self.max_model_len = list(words), state, kind, max_model_len
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0
        self.seen: list[tuple[list[int], dict, str]] = []
        self.fail: BaseException | None = None

    async def start(self):
        pass

    async def stop(self):
        pass

    async def _hold(self):
        self.entered += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.005)

    def _deltas(self):
        if self.fail is not None:
            raise self.fail
        last = len(self.words) - 1
        return [Delta(w, 1, "stop" if i == last else None) for i, w in enumerate(self.words)]

    async def stream(self, writer, req, prompt_ids, sampling, request_id):
        self.seen.append((prompt_ids, sampling, request_id))
        yield writer.opening()
        await self._hold()
        for delta in self._deltas():
            yield writer.add(delta)
        yield writer.closing()

    async def complete(self, writer, req, prompt_ids, sampling, request_id):
        self.seen.append((prompt_ids, sampling, request_id))
        await self._hold()
        for delta in self._deltas():
            writer.add(delta)
        return writer.response()


@pytest.fixture(scope="module")
def model_path():
    from inference_course.models import resolve_model

    return resolve_model()


@pytest.fixture
def make_client(model_path):
    """``make_client(backend=None, **ServiceConfig fields)`` -> a TestClient on a fresh app (lifespan run)."""
    from fastapi.testclient import TestClient

    opened = []

    def make(backend=None, **config):
        backend = backend or ScriptedBackend()
        app = create_app(ServiceConfig(model=model_path, api_keys=dict(KEYS), **config), backend=backend)
        client = TestClient(app, raise_server_exceptions=False).__enter__()
        opened.append(client)
        client.backend, client.service = backend, app.state.service
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def _metrics(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics", headers=ALPHA).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "inference_course.service.access"]


def test_probes_are_open_and_every_other_path_needs_a_key(make_client):
    client = make_client()
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/nowhere"):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-alpha-0123456789"}):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["type"] == "invalid_api_key"
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert client.post(path, json=CHAT).status_code == 401
    assert client.backend.seen == [], "a request without a key reached the backend"
    models = client.get("/v1/models", headers=ALPHA).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("smollm2", 128)]
    assert client.get("/nowhere", headers=ALPHA).status_code == 404


def test_the_openai_sdk_drives_the_app(make_client):
    client = make_client()
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-beta-9876543210", max_retries=0,
                        http_client=client)
    chat = sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.choices[0].message.content == "Hello there!" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens == 3 and chat.usage.prompt_tokens == len(client.backend.seen[-1][0])
    stream = sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
    assert chunks[-1].usage.completion_tokens == 3
    text = sdk.completions.create(model="smollm2", prompt="Say", max_tokens=4, temperature=0, seed=7, stop=["\n"])
    assert text.choices[0].text == "Hello there!"
    sampling = client.backend.seen[-1][1]
    assert (sampling["max_tokens"], sampling["temperature"], sampling["seed"], sampling["stop"]) == (4, 0.0, 7, ["\n"])
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], temperature=3)
    with pytest.raises(openai.BadRequestError, match="context of 128"):
        sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=1000)
    bad_key = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-nope", max_retries=0, http_client=client)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_invalid_bodies_are_clear_4xx_errors(make_client):
    client = make_client()

    def post(body, path="/v1/chat/completions", raw=None):
        answer = (client.post(path, headers=ALPHA, json=body) if raw is None else
                  client.post(path, headers={**ALPHA, "content-type": "application/json"}, content=raw))
        return answer.status_code, answer.json()["error"]

    code, error = post({**CHAT, "temperature": "0.5"})
    assert code == 422 and error["param"] == "temperature" and "temperature" in error["message"]
    code, error = post({**CHAT, "stop": ["ok", ""]})
    assert code == 422 and error["param"] == "stop.1", error
    code, error = post({**CHAT, "n": 2})
    assert code == 422 and error["param"] == "n"
    code, error = post({**CHAT, "messages": []})
    assert code == 422 and error["param"] == "messages"
    code, error = post(None, raw=b'{"model": "smollm2", "messages": [')
    assert code == 400 and "not valid JSON" in error["message"]
    assert post([1, 2])[0] == 422
    code, error = post({"model": "smollm2", "prompt": [5, 10**9]}, "/v1/completions")
    assert code == 400 and error["param"] == "prompt"
    code, error = post({"model": "smollm2", "prompt": "word " * 200}, "/v1/completions")
    assert code == 400 and error["param"] == "messages" and "128" in error["message"]
    code, error = post({**CHAT, "max_tokens": 500})
    assert code == 400 and error["param"] == "max_tokens"
    code, error = post({**CHAT, "model": "other"})
    assert code == 404 and error["code"] == "model_not_found"
    # Half a surrogate pair, escaped in JSON: not Unicode text (the tokenizer raised a TypeError, a 500)
    lone = b'"a \\ud800 b"'
    for path, raw, param in (
            ("/v1/completions", b'{"model": "smollm2", "prompt": ' + lone + b'}', "prompt"),
            ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": ' + lone + b'}]}',
             "messages.0.content"),
            ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "text", '
                                     b'"text": ' + lone + b'}]}]}', "messages.0.content"),
            ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], '
                                     b'"stop": [' + lone + b']}', "stop"),
            ("/v1/completions", b'{"model": ' + lone + b', "prompt": "Hi"}', "model")):
        code, error = post(None, path, raw)
        # the validator names the surrogate on every text field, length-limited ones (prompt, stop) included
        assert code == 422 and "lone UTF-16 surrogate" in error["message"] and error["param"].startswith(param), (path, error)
    code, error = post(None, "/v1/completions", b'{"model": "smollm2", "prompt": "Hi", "stop": ' + lone + b'}')
    assert code == 422 and "lone UTF-16 surrogate" in error["message"] and error["param"].startswith("stop"), error
    code, error = post({"model": "smollm2", "prompt": ""}, "/v1/completions")
    assert code == 422 and "at least 1 character" in error["message"], error
    # a complete pair (an emoji) is text
    pair = client.post("/v1/completions", headers={**ALPHA, "content-type": "application/json"},
                       content=b'{"model": "smollm2", "prompt": "\\ud83d\\ude42", "max_tokens": 2}')
    assert pair.status_code == 200, pair.text
    assert len(client.backend.seen) == 1, "an invalid request reached the backend"


def test_a_body_over_the_limit_is_413_with_or_without_content_length(make_client):
    client = make_client(ScriptedBackend(max_model_len=4096), max_body_bytes=2000)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}
    answer = client.post("/v1/chat/completions", headers=ALPHA, json=big)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == 413

    def chunked():
        raw = json.dumps(big).encode()
        for i in range(0, len(raw), 500):
            yield raw[i:i + 500]

    answer = client.post("/v1/chat/completions", headers={**ALPHA, "content-type": "application/json"},
                         content=chunked())
    assert answer.status_code == 413
    small = {**CHAT, "messages": [{"role": "user", "content": "x" * 1500}]}
    assert client.post("/v1/chat/completions", headers=ALPHA, json=small).status_code == 200
    assert len(client.backend.seen) == 1


def test_rate_limit_answers_429_with_retry_after_per_tenant(make_client, caplog):
    caplog.set_level(logging.INFO, logger="inference_course.service.access")
    client = make_client(rate_limit=0.01, rate_burst=3)  # one token per 100 s: no refill during the test
    codes = [client.post("/v1/chat/completions", headers=ALPHA, json=CHAT) for _ in range(5)]
    assert [a.status_code for a in codes] == [200, 200, 200, 429, 429]
    refused = codes[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 100
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert client.post("/v1/chat/completions", headers=BETA, json=CHAT).status_code == 200  # its own bucket
    assert len(client.backend.seen) == 4
    assert [line["reason"] for line in _access_lines(caplog) if line["status"] == 429] == ["rate_limited"] * 2
    assert _metrics(client)[("service_rejections_total", (("reason", "rate_limited"),))] == 2


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_503_when_max_in_flight_is_reached_and_the_slot_comes_back(make_client):
    client = make_client(max_in_flight=2)
    client.backend.gate.clear()
    held = []
    threads = [threading.Thread(target=lambda: held.append(
        client.post("/v1/chat/completions", headers=ALPHA, json=CHAT).status_code)) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        _wait_for(lambda: client.backend.entered == 2)
        assert client.service.admission.in_flight == 2
        answer = client.post("/v1/chat/completions", headers=BETA, json={**CHAT, "stream": True})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "limit of 2" in answer.json()["error"]["message"]
        assert client.get("/ready").status_code == 200  # full is not unready
    finally:
        client.backend.gate.set()
        for thread in threads:
            thread.join(20)
    assert held == [200, 200]
    assert client.service.admission.in_flight == 0
    assert client.post("/v1/chat/completions", headers=BETA, json=CHAT).status_code == 200


@pytest.mark.parametrize("state, kind, health", [("starting", "engine", 200), ("dead", "engine", 503),
                                                 ("dead", "upstream", 200)])
def test_503_while_the_backend_is_not_ready(make_client, state, kind, health):
    client = make_client(ScriptedBackend(state=state, kind=kind))
    answer = client.post("/v1/chat/completions", headers=ALPHA, json=CHAT)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["type"] == "service_unavailable"
    assert client.get("/ready").status_code == 503 and client.get("/ready").json() == {"status": state}
    assert client.get("/health").status_code == health
    assert client.backend.seen == []
    client.backend.state = "ready"
    assert client.post("/v1/chat/completions", headers=ALPHA, json=CHAT).status_code == 200
    assert client.get("/ready").status_code == client.get("/health").status_code == 200


def test_draining_answers_503_with_connection_close(make_client):
    client = make_client()
    client.service.draining = True
    answer = client.post("/v1/completions", headers=ALPHA, json={"model": "smollm2", "prompt": "Hi"})
    assert answer.status_code == 503
    assert answer.headers["connection"] == "close" and answer.headers["retry-after"] == "1"
    assert client.get("/ready").status_code == 503 and client.get("/ready").json() == {"status": "draining"}
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=ALPHA).status_code == 200
    assert client.backend.seen == []


def test_request_ids_are_echoed_or_replaced(make_client):
    client = make_client()
    answer = client.post("/v1/chat/completions", headers={**ALPHA, "X-Request-Id": "trace-42.a:b"}, json=CHAT)
    assert answer.headers["x-request-id"] == "trace-42.a:b"
    assert answer.json()["id"] == "chatcmpl-trace-42.a:b"
    assert client.backend.seen[-1][2].startswith("trace-42.a:b-")  # unique per engine request
    for bad in ("has spaces", "x" * 65, "semi;colon", ""):
        answer = client.get("/health", headers={"X-Request-Id": bad})
        new = answer.headers["x-request-id"]
        assert new != bad and len(new) == 32 and int(new, 16) >= 0
    assert client.get("/v1/models").headers["x-request-id"]  # a refused request has one too
    assert len({client.get("/health").headers["x-request-id"] for _ in range(5)}) == 5


def test_one_access_log_line_per_request_with_the_tenant_never_the_key(make_client, caplog):
    caplog.set_level(logging.INFO, logger="inference_course.service.access")
    client = make_client()
    client.post("/v1/chat/completions", headers={**ALPHA, "X-Request-Id": "log-1"}, json=CHAT)
    client.post("/v1/chat/completions", headers={**BETA, "X-Request-Id": "log-2"}, json={**CHAT, "stream": True})
    client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-guess", "X-Request-Id": "log-3"}, json=CHAT)
    client.post("/v1/chat/completions", headers={**ALPHA, "X-Request-Id": "log-4"}, json={**CHAT, "n": 3})
    client.get("/health", headers={"X-Request-Id": "log-5"})
    lines = _access_lines(caplog)
    assert [line["request_id"] for line in lines] == ["log-1", "log-2", "log-3", "log-4", "log-5"]
    assert [(line["tenant"], line["status"]) for line in lines] == [
        ("alpha", 200), ("beta", 200), (None, 401), ("alpha", 422), ("-", 200)]
    assert [line["reason"] for line in lines] == [None, None, "unauthorized", "invalid", None]
    assert lines[0]["output_tokens"] == lines[1]["output_tokens"] == 3
    assert lines[1]["ttft_ms"] is not None and lines[0]["duration_ms"] >= 0
    for secret in (*KEYS, "sk-guess"):
        assert secret not in caplog.text


def test_metrics_count_requests_tokens_and_rejections(make_client):
    client = make_client()
    before = _metrics(client)
    # The error series exist at 0 before any error: rate() cannot see the increments that create a series,
    # so a first burst of 503s would otherwise be invisible to the error-ratio alerts.
    for route in ("/v1/completions", "/v1/chat/completions"):
        for code in ("500", "503", "504", "429"):
            assert before[("service_requests_total", (("code", code), ("route", route)))] == 0
    assert before[("service_rejections_total", (("reason", "overloaded"),))] == 0
    for _ in range(3):
        client.post("/v1/chat/completions", headers=ALPHA, json=CHAT)
    client.post("/v1/completions", headers=ALPHA, json={"model": "smollm2", "prompt": "Hi", "stream": True})
    client.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi"})
    after = _metrics(client)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("service_requests_total", route="/v1/chat/completions", code="200") == 3
    assert moved("service_requests_total", route="/v1/completions", code="200") == 1
    assert moved("service_requests_total", route="/v1/completions", code="401") == 1
    assert moved("service_output_tokens_total") == 4 * 3
    assert moved("service_rejections_total", reason="unauthorized") == 1
    assert moved("service_request_duration_seconds_count", route="/v1/chat/completions") == 3
    assert moved("service_time_to_first_token_seconds_count") == 4
    assert after[("service_requests_in_flight", ())] == 0 and after[("service_ready", ())] == 1


def test_timeouts_are_504_or_an_error_event(make_client):
    client = make_client(request_timeout_s=0.3)
    client.backend.gate.clear()
    before = _metrics(client)
    try:
        answer = client.post("/v1/chat/completions", headers=ALPHA, json=CHAT)
        assert answer.status_code == 504 and answer.json()["error"]["type"] == "timeout"
        answer = client.post("/v1/chat/completions", headers=ALPHA, json={**CHAT, "stream": True})
        assert answer.status_code == 200
        events = _events(answer.content)
        assert json.loads(events[-2])["error"]["code"] == 504 and events[-1] == "[DONE]"
    finally:
        client.backend.gate.set()
    assert client.service.admission.in_flight == 0
    after = _metrics(client)
    # the stream kept its 200 on the wire: its cut is counted apart, the 504 is not counted twice
    cut = ("service_streams_cut_total", (("reason", "timeout"),))
    assert after.get(cut, 0) - before.get(cut, 0) == 1


def test_engine_death_during_a_request_is_503_or_an_error_event(make_client):
    client = make_client()
    client.backend.fail = EngineDead("the engine died while serving this request")
    answer = client.post("/v1/chat/completions", headers=ALPHA, json=CHAT)
    assert answer.status_code == 503 and "died" in answer.json()["error"]["message"]
    answer = client.post("/v1/chat/completions", headers=ALPHA, json={**CHAT, "stream": True})
    events = _events(answer.content)
    assert answer.status_code == 200 and json.loads(events[-2])["error"]["code"] == 503


def test_an_unexpected_error_is_a_json_500_logged_as_500(make_client, caplog):
    caplog.set_level(logging.INFO, logger="inference_course.service")
    client = make_client()
    client.backend.fail = RuntimeError("a bug")
    answer = client.post("/v1/chat/completions", headers={**ALPHA, "X-Request-Id": "boom"}, json=CHAT)
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "boom"
    assert answer.json()["error"]["type"] == "internal_error"
    line = [x for x in _access_lines(caplog) if x["request_id"] == "boom"]
    assert [(x["status"], x["reason"]) for x in line] == [(500, "internal_error")]
    assert "RuntimeError: a bug" in caplog.text  # the traceback is in the server's log
    client.backend.fail = None
    assert client.post("/v1/chat/completions", headers=ALPHA, json=CHAT).status_code == 200
    assert client.service.admission.in_flight == 0


# -- schemathesis against /openapi.json (shared with test_service.py, which runs it on the real engine) --

def fuzz_openapi(base_url: str, headers: list[dict], served_name: str, examples: int,
                 cap_tokens: int = 4) -> tuple[dict, list[str]]:
    """schemathesis over every operation of ``base_url``/openapi.json, deterministic (derandomized
    hypothesis): positive examples (for the served model, at most ``cap_tokens`` to generate, so that
    the engine's time goes to many cases rather than long answers) and, where there is a body,
    negative ones. Checks: no 5xx, the documented content type and response schema, and no 422 for
    data that the schema says is valid. Requests rotate over ``headers`` (one per tenant, each with
    its own rate-limit bucket). Returns ({(operation, mode, status): count}, [failures])."""
    import collections
    import itertools

    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", headers=headers[0], timeout=60)
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    rotation = itertools.cycle(headers)
    session = requests.Session()
    session.trust_env = False
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), print_blob=False,
                      phases=[Phase.explicit, Phase.generate])  # no shrinking: a failure reports fast
            def check(case):
                if mode.is_positive and isinstance(case.body, dict):
                    case.body["model"] = served_name  # past the 404 for unknown models, into the engine
                    for name in ("max_tokens", "max_completion_tokens"):
                        if not isinstance(case.body.get(name), int) or case.body[name] > cap_tokens:
                            case.body[name] = cap_tokens
                response = case.call(base_url=base_url, session=session, headers=next(rotation), timeout=120)
                statuses[(operation.label, mode.value, response.status_code)] += 1
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                                         content_type_conformance])
                assert not (mode.is_positive and response.status_code == 422), \
                    f"schema-valid data refused: {response.text[:400]} for {case.body!r}"

            try:
                check()
            except Exception as exc:  # keep going: one report for every operation
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:2000]}")
    return dict(statuses), failures


@pytest.fixture
def served_app(model_path):
    """The app with a ScriptedBackend, behind a real uvicorn (in a thread) on a free port."""
    import uvicorn

    from inference_course.servers import free_port

    app = create_app(ServiceConfig(model=model_path, api_keys=dict(KEYS)), backend=ScriptedBackend(max_model_len=2048))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started or not thread.is_alive(), 60)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(served_app):
    url, app = served_app
    statuses, failures = fuzz_openapi(url, [ALPHA, BETA], "smollm2", examples=60)
    assert failures == [], "\n\n".join(failures)
    assert {code for (_, _, code) in statuses} <= {200, 400, 404, 413, 422}, statuses
    for route in ("POST /v1/chat/completions", "POST /v1/completions"):  # the fuzzing got past validation
        assert statuses.get((route, "positive", 200), 0) >= 10, statuses
        assert statuses.get((route, "negative", 422), 0) >= 10, statuses
    assert app.state.service.admission.in_flight == 0


def test_a_chat_template_refusal_is_a_400_and_an_unknown_model_is_refused_before_tokenizing(make_client):
    from jinja2 import TemplateError

    client = make_client()
    tokenizer = client.service.tokenizer

    def refuse(messages):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    tokenizer._encode_chat = refuse
    answer = client.post("/v1/chat/completions", headers=ALPHA, json=CHAT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages" and "roles must alternate" in error["message"]

    from jinja2 import TemplateSyntaxError

    def broken(messages):  # a template that does not parse is the server's fault, not the request's
        raise TemplateSyntaxError("unexpected '}'", lineno=1)

    tokenizer._encode_chat = broken
    answer = client.post("/v1/chat/completions", headers=ALPHA, json=CHAT)
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "internal_error", answer.text

    def fail(*args):
        raise AssertionError("tokenized a request for a model this server does not serve")

    tokenizer._encode = fail
    for path, body in (("/v1/chat/completions", {**CHAT, "model": "other"}),
                       ("/v1/completions", {"model": "other", "prompt": "Hi"})):
        answer = client.post(path, headers=ALPHA, json=body)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", answer.text
    assert client.backend.seen == []
