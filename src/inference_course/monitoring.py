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
