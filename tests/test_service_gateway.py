"""The service as a thin gateway, architecture (b): ``vllm serve`` runs beside it and the service checks
each request, then streams the answer through. Same answers as the engine's own server, the keys that
``vllm serve`` leaves open enforced in front of it, and a client's disconnect reaching the engine."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from inference_course import servers
from inference_course.models import resolve_model
from test_service import ENGINE, FRANCE, NAME, metric, wait_until

pytestmark = pytest.mark.engine

KEYS = {"alice": "sk-test-gateway-alice-20b7"}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}


@pytest.fixture(scope="module")
def native_and_gateway():
    model = resolve_model()
    native = servers.vllm_server(model, served_name=NAME, **ENGINE)
    gateway = servers.service_server(model, upstream=native.url, keys=KEYS, served_name=NAME)
    try:
        native.start()
        native.wait_ready()
        gateway.start()
        gateway.wait_ready()
        yield native, gateway
    finally:
        gateway.stop()
        native.stop()


def _sdk(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_the_gateway_answers_as_vllm_serve_does_and_streams(native_and_gateway):
    native, gateway = native_and_gateway
    through = _sdk(gateway, KEYS["alice"])
    ask = dict(model=NAME, messages=FRANCE, temperature=0, max_tokens=16)
    direct = _sdk(native).chat.completions.create(**ask).choices[0].message.content
    answer = through.chat.completions.create(**ask)
    assert answer.choices[0].message.content == direct and "Paris" in direct
    chunks = list(through.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3, "the answer did not stream through the gateway"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    text = through.completions.create(model=NAME, prompt="One, two,", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 6 and text.choices[0].finish_reason == "length"


def test_the_gateway_guards_what_vllm_serve_leaves_open(native_and_gateway):
    native, gateway = native_and_gateway
    body = {"model": NAME, "messages": FRANCE, "max_tokens": 4}
    assert httpx.post(native.url + "/v1/chat/completions", json=body, timeout=120, trust_env=False).status_code == 200
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=60,
                            trust_env=False)
        assert answer.status_code == 401
    assert httpx.get(gateway.url + "/v1/models", trust_env=False).status_code == 401
    answer = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "temperature": "0.5"},
                        headers=ALICE, timeout=60, trust_env=False)
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "temperature"
    ready = httpx.get(gateway.url + "/ready", trust_env=False)
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_a_disconnect_through_the_gateway_aborts_the_request_in_vllm(native_and_gateway):
    native, gateway = native_and_gateway
    generated = lambda: metric(native.url, "vllm:generation_tokens_total")  # noqa: E731
    running = lambda: metric(native.url, "vllm:num_requests_running")  # noqa: E731
    before = generated()
    stream = _sdk(gateway, KEYS["alice"]).completions.create(
        model=NAME, prompt="Count to one thousand:", max_tokens=1500, stream=True, extra_body={"ignore_eos": True})
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            break
    assert running() >= 1, "the request is not running in vllm serve while its stream is open"
    stream.close()
    wait_until(lambda: running() == 0, 20, "vllm serve's running requests back to 0 after the client left")
    settled = generated()
    time.sleep(2)
    assert generated() == settled, "vllm serve kept generating for a client that left the gateway"
    assert settled - before < 750
