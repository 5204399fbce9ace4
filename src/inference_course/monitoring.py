"""Prometheus for the course: configs, rule files, dashboards, and queries through Prometheus' HTTP API.

The files a learner opens live in ``docker/``: ``prometheus/rules/course-service.rules.yml`` (recording and
alerting rules, unit-tested by ``course-service.tests.yml`` with ``promtool test rules``) and
``grafana/dashboards/course-service.json`` (a Grafana dashboard). This module writes the Prometheus
configuration that scrapes a running server, starts nothing itself (``servers.prometheus_server`` does),
and reads answers back::

    from inference_course import monitoring, servers
    config = monitoring.write_config(tmp / "prometheus.yml", [monitoring.Job("course-service", svc.url, token=key)],
                                     rule_files=[monitoring.RULES])
    prom = servers.prometheus_server(config)
    monitoring.query(prom.url, "sum(rate(vllm:generation_tokens_total[1m]))")
"""
from __future__ import annotations

import functools
import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docker" / "prometheus" / "rules" / "course-service.rules.yml"
RULE_TESTS = ROOT / "docker" / "prometheus" / "rules" / "course-service.tests.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "course-service.json"
ALERTMANAGER = ROOT / "docker" / "alertmanager" / "alertmanager.yml"

# Names in PromQL that are not metrics: functions, aggregations, keywords (for messages only).
_NOT_METRICS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
    "bool", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "vector", "scalar",
    "abs", "round", "clamp_min", "clamp_max", "time", "label_replace", "absent", "le", "inf", "nan",
}
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w(])")


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error (bad PromQL, a timeout)."""


@dataclass
class Job:
    """One scrape job: a name, the server's base URL (``/metrics`` is added), and an optional Bearer token."""
    name: str
    url: str
    token: str | None = None
    metrics_path: str = "/metrics"


def write_config(path: str | Path, jobs: list[Job], *, rule_files: list[str | Path] = (),
                 scrape_interval_s: float = 1.0, evaluation_interval_s: float = 1.0,
                 alertmanager_url: str | None = None) -> Path:
    """A prometheus.yml scraping ``jobs`` (each target from its URL's host:port) with these rule files."""
    import yaml

    def seconds(value: float) -> str:
        return f"{int(value * 1000)}ms" if value < 1 else f"{value:g}s"

    config: dict = {
        "global": {"scrape_interval": seconds(scrape_interval_s), "evaluation_interval": seconds(evaluation_interval_s)},
        "scrape_configs": [],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    if alertmanager_url:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [urlparse(alertmanager_url).netloc]}]}]}
    for job in jobs:
        entry = {"job_name": job.name, "metrics_path": job.metrics_path,
                 "static_configs": [{"targets": [urlparse(job.url).netloc]}]}
        if job.token:
            entry["authorization"] = {"type": "Bearer", "credentials": job.token}
        config["scrape_configs"].append(entry)
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_alertmanager_config(path: str | Path, webhook_url: str, *, template: str | Path = ALERTMANAGER,
                              group_wait_s: float | None = None, group_interval_s: float | None = None,
                              repeat_interval_s: float | None = None) -> Path:
    """The course's Alertmanager configuration (``docker/alertmanager/alertmanager.yml``) with its webhook
    pointed at ``webhook_url`` and, where given, the route timings replaced (on every route that sets them)."""
    import yaml

    def duration(value: float) -> str:
        return f"{int(value * 1000)}ms" if value < 1 else f"{value:g}s"

    config = yaml.safe_load(Path(template).read_text(encoding="utf-8"))
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    timings = {"group_wait": group_wait_s, "group_interval": group_interval_s, "repeat_interval": repeat_interval_s}

    def retime(route: dict, top: bool) -> None:
        for key, value in timings.items():
            if value is not None and (top or key in route):
                route[key] = duration(value)
        for child in route.get("routes", []):
            retime(child, False)

    retime(config["route"], True)
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def amtool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Alertmanager's own amtool (``amtool check-config``, ``amtool config routes test``)."""
    binary = shutil.which("amtool")
    if not binary:
        raise FileNotFoundError("amtool is not installed. Fix: `apt-get install prometheus-alertmanager` "
                                "(Debian/Ubuntu; it ships amtool), or put the amtool of a prometheus.io release on PATH.")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)


def _first_match(items, predicate, timeout: float, poll: float, what: str, describe):
    """The first of ``items()`` for which ``predicate`` holds, polling every ``poll`` s; after ``timeout`` s a
    TimeoutError saying what did arrive (``describe(items())``)."""
    deadline = time.monotonic() + timeout
    while True:
        for item in items():
            if predicate(item):
                return item
        if time.monotonic() > deadline:
            raise TimeoutError(f"no matching {what} within {timeout:g} s; received: {describe(items()) or 'none'}")
        time.sleep(poll)


class WebhookReceiver:
    """An HTTP endpoint Alertmanager can notify (its webhook_config): it keeps every notification with the
    time it arrived. A context manager; serves on 127.0.0.1 in a thread::

        with monitoring.WebhookReceiver() as hook:
            write_alertmanager_config(path, hook.url)
            ...
            hook.wait_for(lambda n: n["status"] == "firing")
    """

    def __init__(self, path: str = "/alerts"):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        self.notifications: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body)
                    code = 200 if self.path == path else 404
                except ValueError:
                    payload, code = None, 400
                if code == 200:
                    with receiver._lock:
                        receiver.notifications.append({"received": time.time(), **payload})
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):  # keep notebook output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.notifications)

    def wait_for(self, predicate, timeout: float = 120, poll: float = 0.2) -> dict:
        """The first notification for which ``predicate(notification)`` holds; TimeoutError naming what came."""
        return _first_match(self.received, predicate, timeout, poll, "notification", lambda notes: [
            (n["status"], sorted({a["labels"].get("alertname", "?") for a in n["alerts"]})) for n in notes])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "WebhookReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def alertmanager_alerts(am_url: str) -> list[dict]:
    """Alerts Alertmanager holds now (API v2), each with its labels, status and time it started."""
    import httpx

    response = httpx.get(am_url.rstrip("/") + "/api/v2/alerts", timeout=30, trust_env=False)
    response.raise_for_status()
    return response.json()


def scrape(client, path: str = "/metrics") -> dict[str, list[tuple[dict, float]]]:
    """A Prometheus text page (``client.get(path)``, e.g. an httpx.Client with the server's base URL and
    key) parsed by prometheus_client as {sample name: [(labels, value), ...]}."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = client.get(path)
    answer.raise_for_status()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0.0 when none)."""
    return sum(value for have, value in samples.get(name, [])
               if all(have.get(k) == str(v) for k, v in labels.items()))


def promtool_binary() -> str | None:
    return shutil.which("promtool")


def promtool(*args: str, cwd: str | Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Prometheus' own promtool (``promtool check rules``, ``promtool test rules``)."""
    binary = promtool_binary()
    if not binary:
        raise FileNotFoundError("promtool is not installed. Fix: `apt-get install prometheus` (Debian/Ubuntu; "
                                "it ships promtool), or put the promtool of a prometheus.io release on PATH.")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _api(prom_url: str, path: str, params: dict | None = None, timeout: float = 30) -> dict | list:
    import httpx

    response = httpx.get(prom_url.rstrip("/") + path, params=params, timeout=timeout, trust_env=False)
    body = response.json()
    if body.get("status") != "success":
        raise PrometheusError(f"{path} {params or ''}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(prom_url: str, expr: str, at: float | None = None) -> list[dict]:
    """An instant query: the result vector as ``[{"metric": {...}, "value": float}]``."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _api(prom_url, "/api/v1/query", params)
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": float(data["result"][1])}]
    return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]


def query_range(prom_url: str, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
    """A range query: ``[{"metric": {...}, "t": [...], "v": [...]}]`` (for plotting panels)."""
    data = _api(prom_url, "/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                  "step": f"{step_s:g}"})
    return [{"metric": r["metric"], "t": [float(t) for t, _ in r["values"]], "v": [float(v) for _, v in r["values"]]}
            for r in data["result"]]


def wait_for(prom_url: str, expr: str, predicate=lambda result: bool(result), timeout: float = 60,
             poll: float = 0.5) -> list[dict]:
    """Poll ``expr`` until ``predicate(result)`` holds; raise TimeoutError with the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(prom_url, expr)
        if predicate(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {expr} -> {result}")
        time.sleep(poll)


def targets_up(prom_url: str) -> dict[str, str]:
    """Scrape targets by job: 'up', 'down' or 'unknown' (and the last error, if any)."""
    data = _api(prom_url, "/api/v1/targets")
    return {t["labels"]["job"]: t["health"] + (f" ({t['lastError']})" if t.get("lastError") else "")
            for t in data["activeTargets"]}


def rules(prom_url: str) -> list[dict]:
    """Every loaded rule with its health ('ok', 'err', 'unknown'), last error and, for alerts, its state."""
    out = []
    for group in _api(prom_url, "/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            out.append({"group": group["name"], "name": rule["name"], "type": rule["type"],
                        "health": rule.get("health"), "error": rule.get("lastError", ""),
                        "state": rule.get("state"), "query": rule["query"]})
    return out


def alerts(prom_url: str) -> list[dict]:
    """Active alerts (pending or firing) as Prometheus reports them."""
    return _api(prom_url, "/api/v1/alerts")["alerts"]


def dashboard_targets(path: str | Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) for every query of a Grafana dashboard, rows' nested panels included."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", ""), target.get("refId", ""), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def rule_expressions(path: str | Path = RULES) -> list[tuple[str, str, str]]:
    """(kind 'record'/'alert', name, PromQL) for every rule of a rule file."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [("record" if "record" in rule else "alert", rule.get("record") or rule.get("alert"), rule["expr"])
            for group in data["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (a heuristic for error messages; Prometheus is the judge)."""
    text = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', '""', expr))      # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                                  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = {m.group(1) for m in _NAME.finditer(text)}
    return {n for n in names if n.lower() not in _NOT_METRICS and not re.fullmatch(r"[0-9.e]+", n)}


def finite(result: list[dict]) -> bool:
    return bool(result) and all(math.isfinite(r["value"]) for r in result)


@functools.lru_cache(maxsize=None)
def _quiet_http_sink_class():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from oteltest.sink import HttpSink

    class QuietHttpSink(HttpSink):
        """oteltest's HttpSink on 127.0.0.1, without a line on stderr per POST (it would land in notebooks),
        listening when ``start`` returns (oteltest binds in its thread: a stop right after start could wait
        for ever, and a first POST could find no listener)."""

        def start(self):
            self.httpd = self._make_server()
            self.svr_thread.start()

        def run_server(self):
            self.httpd.serve_forever()

        def _make_server(self):
            sink = self

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self):  # noqa: N802
                    if self.headers.get("Content-Length") is None:  # OTLP exporters send a length
                        self.send_response(411)
                        self.end_headers()
                        return
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    handle = sink.handlers.get(self.path)
                    if handle:
                        handle(body, dict(self.headers.items()))
                    self.send_response(200 if handle else 404)
                    self.end_headers()

                def log_message(self, *args):
                    pass

            return HTTPServer(("127.0.0.1", self.port), Handler)

    return QuietHttpSink


def _QuietHttpSink(*args, **kw):  # noqa: N802  (the class is made once, on first use: oteltest is imported lazily)
    return _quiet_http_sink_class()(*args, **kw)


class SpanSink:
    """A real OpenTelemetry receiver: oteltest's OTLP sink (PyPI ``oteltest``; no Jaeger or collector runs
    here) keeping every span it receives as a plain dict. ``protocol="grpc"`` (OTLP/gRPC): vLLM exports to
    it with ``otlp_traces_endpoint=sink.endpoint`` (and ``OTEL_EXPORTER_OTLP_TRACES_INSECURE=true``)::

        with monitoring.SpanSink() as sink:
            ...   # start vLLM with --otlp-traces-endpoint sink.endpoint, send requests
            sink.wait_for(lambda s: s["name"] == "llm_request")

    ``protocol="http"`` (OTLP/HTTP, protobuf or JSON bodies; ``sink.endpoint`` is the ``/v1/traces`` URL):
    what Triton's OpenTelemetry mode speaks (``--trace-config opentelemetry,url=...``)."""

    def __init__(self, port: int | None = None, protocol: str = "grpc"):
        import logging
        import threading

        from oteltest.sink import GrpcSink
        from oteltest.sink.handler import RequestHandler

        from .servers import free_port

        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol is {protocol!r}: use 'grpc' (OTLP/gRPC) or 'http' (OTLP/HTTP)")
        self._spans: list[dict] = []
        self._lock = threading.Lock()
        sink = self

        class Collect(RequestHandler):
            def handle_trace(self, request, headers):
                # OTLP/JSON writes ids as hex; protobuf's JSON parser read them as base64: write them back
                json_ids = "json" in {k.lower(): v for k, v in (headers or {}).items()}.get("content-type", "")
                spans = [span_dict(span, resource.resource, json_ids=json_ids) for resource in request.resource_spans
                         for scope in resource.scope_spans for span in scope.spans]
                with sink._lock:
                    sink._spans.extend(spans)

            def handle_metrics(self, request, headers):
                pass

            def handle_logs(self, request, headers):
                pass

        self.port = port or free_port()
        self.protocol = protocol
        if protocol == "grpc":
            self._sink = GrpcSink(Collect(), logging.getLogger("oteltest"), port=self.port)
            self.endpoint = f"grpc://127.0.0.1:{self.port}"
        else:
            self._sink = _QuietHttpSink(Collect(), logging.getLogger("oteltest"), port=self.port)
            self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self._sink.start()

    def spans(self) -> list[dict]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, predicate, timeout: float = 60, poll: float = 0.2) -> dict:
        return _first_match(self.spans, predicate, timeout, poll, "span",
                            lambda spans: sorted({s["name"] for s in spans}))

    def close(self) -> None:
        self._sink.stop()

    def __enter__(self) -> "SpanSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def span_dict(span, resource=None, json_ids: bool = False) -> dict:
    """An OTLP protobuf span as a dict: ids in hex, times in seconds since the epoch, attributes by key.
    ``json_ids``: the span was parsed from OTLP/JSON, whose ids are hex strings that protobuf's JSON parser
    decoded as base64; encoding the bytes back gives the sender's hex."""
    import base64

    def hexid(raw: bytes) -> str:
        return base64.b64encode(raw).decode() if json_ids else raw.hex()

    return {
        "name": span.name,
        "trace_id": hexid(span.trace_id),
        "span_id": hexid(span.span_id),
        "parent_span_id": hexid(span.parent_span_id) or None,
        "start": span.start_time_unix_nano / 1e9,
        "end": span.end_time_unix_nano / 1e9,
        "attributes": {kv.key: _any_value(kv.value) for kv in span.attributes},
        "service": next((_any_value(kv.value) for kv in (resource.attributes if resource else [])
                         if kv.key == "service.name"), None),
    }
