"""The monitoring files in docker/ against the real thing: the course's service (architecture (a), vLLM
in-process) scraped by a real Prometheus that loads the course's rules, under a small real load.

- every query of the Grafana dashboard and every recording rule returns data, and finite numbers (a stale
  metric name, a label that does not exist, a ratio that is empty when nothing failed: all show up here
  as an empty result, with the metric names the service does not export named in the message); the GPU
  panels (dcgm-exporter's names, ``gpu_metrics.is_gpu_query``) too where a GPU is here: the course's GPU
  exporter is then scraped beside the service. Without a GPU they evaluate without error and are empty,
  which is asserted, and the test is reported as skipped;
- every rule evaluates without error in Prometheus itself;
- the counters agree exactly with what the client received (output tokens, requests by status);
- stopping the service makes CourseServiceDown go pending (its ``for: 30s`` is promtool's to test).
"""
from __future__ import annotations

import time

import httpx
import pytest

from inference_course import bench, gpu_metrics, monitoring, servers
from inference_course.models import resolve_model
from inference_course.profiles import get_profile

pytestmark = pytest.mark.engine

P = get_profile()
ENGINE = P.serving_engine_kwargs()
KEY = "sk-monitoring-test-7c1e"
NAME = "smollm2"
REQUESTS, TOKENS = 12, 8
GPU_JOB = "gpu-metrics"
NO_GPU = gpu_metrics.unavailable_reason()  # None where NVML sees a GPU


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not servers.prometheus_binary():
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("monitoring")
    service = servers.service_server(resolve_model(), keys={"monitor": KEY}, served_name=NAME, max_in_flight=8,
                                     max_num_seqs=8, **ENGINE)
    prometheus = gpu = None
    try:
        service.start()
        jobs = [monitoring.Job("course-service", service.url, token=KEY)]
        if NO_GPU is None:
            gpu = servers.gpu_metrics_server()
            gpu.start()
            gpu.wait_ready()
            jobs.append(monitoring.Job(GPU_JOB, gpu.url))
        service.wait_ready()
        config = monitoring.write_config(tmp / "prometheus.yml", jobs,
                                         rule_files=[monitoring.RULES], scrape_interval_s=1, evaluation_interval_s=1)
        prometheus = servers.prometheus_server(config, data_dir=tmp / "data")
        prometheus.start()
        prometheus.wait_ready()
        monitoring.wait_for(prometheus.url, 'up{job="course-service"} == 1', timeout=30)
        if gpu:
            monitoring.wait_for(prometheus.url, f'up{{job="{GPU_JOB}"}} == 1', timeout=30)
        words = bench.corpus_words()
        prompts = [" ".join(words[i * 12:(i + 1) * 12]) for i in range(REQUESTS)]  # 12 different prompts
        results, _ = bench.run(service.url, NAME, prompts, concurrency=4, max_tokens=TOKENS, api_key=KEY)
        refused = httpx.post(service.url + "/v1/completions", json={"model": NAME, "prompt": "x"},
                             headers={"Authorization": "Bearer wrong"}, timeout=30, trust_env=False)
        invalid = httpx.post(service.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 0},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=30, trust_env=False)
        yield {"service": service, "prometheus": prometheus, "gpu": gpu, "results": results,
               "codes": [refused.status_code, invalid.status_code]}
    finally:
        if prometheus:
            prometheus.stop()
        if gpu:
            gpu.stop()
        service.stop()


def exported(service) -> set[str]:
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                      trust_env=False) as client:
        return set(monitoring.scrape(client))


def settled(prom_url: str, expr: str, expected: float) -> list[dict]:
    """Wait until Prometheus has scraped the final value of a counter."""
    return monitoring.wait_for(prom_url, expr, lambda r: bool(r) and r[0]["value"] == expected, timeout=30)


def test_the_load_ran(stack):
    assert all(r.ok for r in stack["results"]), [r.error for r in stack["results"] if not r.ok]
    assert [r.output_tokens for r in stack["results"]] == [TOKENS] * REQUESTS
    assert stack["codes"] == [401, 422]


def test_counters_agree_with_the_client(stack):
    prom = stack["prometheus"].url
    tokens = sum(r.output_tokens for r in stack["results"])
    settled(prom, "sum(vllm:generation_tokens_total)", tokens)
    settled(prom, "sum(service_output_tokens_total)", tokens)
    settled(prom, 'sum(service_requests_total{route="/v1/completions",code="200"})', REQUESTS)
    settled(prom, 'sum(service_rejections_total{reason="unauthorized"})', 1)


@pytest.mark.parametrize("title, ref, expr", monitoring.dashboard_targets(),
                         ids=[f"{t}/{r}" for t, r, _ in monitoring.dashboard_targets()])
def test_every_dashboard_query_returns_data(stack, title, ref, expr):
    prom = stack["prometheus"].url
    gpu_panel = gpu_metrics.is_gpu_query(expr)
    if gpu_panel and stack["gpu"] is None:
        # No GPU here: nothing exports dcgm-exporter's names, so the panel is empty by nature. The query must
        # still parse and evaluate in Prometheus (a PrometheusError fails the test) and return nothing.
        result = monitoring.query(prom, expr)
        assert result == [], f"GPU panel '{title}' query {ref} returned data without a GPU exporter: {result}"
        pytest.skip(f"GPU panel '{title}' {ref}: evaluated without error and empty, as it must be without a GPU "
                    f"({NO_GPU}); it must return data where a GPU is (the gpu profile)")
    # rate() over [1m] needs two scrapes after the load, recording rules one evaluation: wait for data.
    try:
        result = monitoring.wait_for(prom, expr, monitoring.finite, timeout=20)
    except TimeoutError:
        source = stack["gpu"] if gpu_panel else stack["service"]
        missing = sorted(n for n in monitoring.metric_names(expr) if not n.startswith("course:")
                         and n not in {"up"} and n not in exported(source))
        pytest.fail(f"panel '{title}' query {ref} returns no finite data: {expr}\n"
                    f"metrics it reads that the {source.name} does not export: {missing or 'none'}")
    assert result


def test_every_rule_evaluates(stack):
    prom = stack["prometheus"].url
    for kind, name, expr in monitoring.rule_expressions():
        if kind == "record":
            monitoring.wait_for(prom, name, monitoring.finite, timeout=20)
    # Each rule group runs on its own schedule (interval 15s): the alert group may not have evaluated yet when
    # the recording rules have (its rules' health is then "unknown"). Wait for one evaluation of every rule.
    deadline = time.monotonic() + 40
    loaded = monitoring.rules(prom)
    while any(r["health"] == "unknown" for r in loaded) and time.monotonic() < deadline:
        time.sleep(0.5)
        loaded = monitoring.rules(prom)
    assert {r["name"] for r in loaded} == {name for _, name, _ in monitoring.rule_expressions()}
    bad = [(r["name"], r["health"], r["error"]) for r in loaded if r["health"] != "ok"]
    assert not bad, f"rules Prometheus could not evaluate: {bad}"
    # A healthy service under a load without 5xx: nothing fires.
    assert [a["labels"]["alertname"] for a in monitoring.alerts(prom)] == []


def test_stopping_the_service_raises_the_down_alert(stack):
    prom = stack["prometheus"].url
    stack["service"].stop()
    monitoring.wait_for(prom, 'up{job="course-service"} == 0', timeout=30)
    deadline = time.monotonic() + 30
    while True:
        states = {a["labels"]["alertname"]: a["state"] for a in monitoring.alerts(prom)}
        if states.get("CourseServiceDown") in {"pending", "firing"}:
            break
        assert time.monotonic() < deadline, f"CourseServiceDown not pending 30 s after the service stopped: {states}"
        time.sleep(0.5)
