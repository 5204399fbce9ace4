"""servers.vllm_router: the real vLLM router (PyPI vllm-router, Rust) in front of two workers.

The workers are stand-ins (tests/router_worker_app.py: they answer with their own name, in a second and
without an engine) so these tests check the router's behaviour the course relies on (vLLM Lab 2.4): how each
policy spreads requests, that its counters agree with the workers' and the client's, that it relays a
stream, and what a client sees when a worker dies. The lab runs the same router in front of real vLLM
replicas.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference_course import servers

TESTS = Path(__file__).parent


def start_workers(names):
    workers = [servers.uvicorn_server("router_worker_app:app", app_dir=TESTS, ready_path="/health",
                                      env={"WORKER_NAME": name}) for name in names]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()  # stops that worker and raises with its log on failure
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def ask(client, **extra) -> str:
    """One completion through the router; returns the name of the worker that answered."""
    response = client.post("/v1/completions", json={"model": "m", "prompt": "hi", **extra.pop("body", {})}, **extra)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def router_samples(router, name):
    text = httpx.get(f"http://{servers.HOST}:{router.ports['metrics']}/metrics", trust_env=False).text
    return {sample.labels.get("worker", sample.labels.get("route")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name}


@pytest.fixture(scope="module")
def workers():
    started = start_workers("AB")
    yield {name: worker for name, worker in zip("AB", started)}
    for worker in started:
        worker.stop()


def test_round_robin_alternates_and_three_counts_agree(workers):
    with servers.vllm_router([w.url for w in workers.values()], policy="round_robin") as router:
        with httpx.Client(base_url=router.url, trust_env=False, timeout=30) as client:
            before = {name: httpx.get(w.url + "/served", trust_env=False).json()["served"] for name, w in workers.items()}
            order = [ask(client) for _ in range(6)]
        assert all(a != b for a, b in zip(order, order[1:])), order
        assert Counter(order) == {"A": 3, "B": 3}, order
        # The router's own count per worker, each worker's count and the client's count agree.
        routed = router_samples(router, "vllm_router_processed_requests_total")
        for name, worker in workers.items():
            served = httpx.get(worker.url + "/served", trust_env=False).json()["served"] - before[name]
            assert served == order.count(name) == routed[worker.url], (name, served, routed)


def test_consistent_hash_keeps_each_session_on_one_worker(workers):
    urls = {w.url: name for name, w in workers.items()}
    with servers.vllm_router(list(urls), policy="consistent_hash") as router:
        with httpx.Client(base_url=router.url, trust_env=False, timeout=30) as client:
            by_session = {f"s{i}": {ask(client, headers={"X-Session-ID": f"s{i}"}) for _ in range(3)} for i in range(16)}
            by_user = {f"u{i}": {ask(client, body={"user": f"u{i}"}) for _ in range(3)} for i in range(4)}
    assert all(len(chosen) == 1 for chosen in by_session.values()), by_session
    assert all(len(chosen) == 1 for chosen in by_user.values()), by_user  # the OpenAI `user` field is a key too
    # 16 sessions all on one worker would happen with probability 2**-15 if the hash spread them evenly
    assert set().union(*by_session.values()) == {"A", "B"}, by_session


def test_a_stream_is_relayed_event_by_event(workers):
    with servers.vllm_router([w.url for w in workers.values()]) as router:
        with httpx.Client(base_url=router.url, trust_env=False, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3 and events[-1] == "data: [DONE]", events
    assert '"text": "A"' in events[0] or '"text": "B"' in events[0], events[0]


def test_a_killed_worker_costs_no_request_and_is_marked_unhealthy():
    a, b = start_workers("AB")
    try:
        with servers.vllm_router([a.url, b.url], policy="round_robin", health_check_interval_s=1) as router:
            with httpx.Client(base_url=router.url, trust_env=False, timeout=30) as client:
                assert Counter(ask(client) for _ in range(4)) == {"A": 2, "B": 2}
                b.stop()
                after = [ask(client) for _ in range(10)]  # ask() fails the test on any non-200 answer
            # the router retried the requests it sent to B on A; the client saw ten answers from A
            assert after == ["A"] * 10, after
            assert router_samples(router, "vllm_router_retries_total").get("/v1/completions", 0) >= 1
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                health = router_samples(router, "vllm_router_worker_health")
                if health.get(b.url) == 0:
                    break
                time.sleep(0.2)
            assert health == {a.url: 1, b.url: 0}, health
            readiness = httpx.get(router.url + "/readiness", trust_env=False).json()
            assert (readiness["healthy_workers"], readiness["total_workers"]) == (1, 2), readiness
    finally:
        a.stop()
        b.stop()


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="round_robin"):
        servers.vllm_router(["http://127.0.0.1:1"], policy="least_conn")
    with pytest.raises(ValueError, match="at least one worker"):
        servers.vllm_router([])
