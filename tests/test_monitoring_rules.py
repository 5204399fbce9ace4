"""The monitoring files in docker/ (fast; no engine): alert and recording rules checked and unit-tested by
Prometheus' own promtool, the tests shown able to fail, and the Grafana dashboard's structure.

That every expression returns data from the real service is tests/test_monitoring_live.py's job.
"""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from inference_course import monitoring

needs_promtool = pytest.mark.skipif(not monitoring.promtool_binary(),
                                    reason="promtool is not installed (apt-get install prometheus)")


@needs_promtool
def test_rules_pass_promtool_check():
    done = monitoring.promtool("check", "rules", str(monitoring.RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(monitoring.rule_expressions())} rules found" in done.stdout


@needs_promtool
def test_rule_unit_tests_pass():
    done = monitoring.promtool("test", "rules", monitoring.RULE_TESTS.name, cwd=monitoring.RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
@pytest.mark.parametrize("old, new, failing", [
    # Without `or vector(0)` the error ratio is empty when nothing failed (test 3 expects 0).
    ('(sum(rate(service_requests_total{route=~"/v1/(chat/)?completions",code=~"5.."}[5m])) or vector(0))',
     'sum(rate(service_requests_total{route=~"/v1/(chat/)?completions",code=~"5.."}[5m]))',
     "course:service_error_ratio:rate5m"),
    # Counting every route: Prometheus' own scrapes and the probes dilute the error ratio (test 1b).
    ('/ sum(rate(service_requests_total{route=~"/v1/(chat/)?completions"}[1h]))',
     "/ sum(rate(service_requests_total[1h]))", "CourseErrorBudgetBurnFast"),
    # Without the short window, the fast burn pages for an incident that is over (test 2).
    ("course:service_error_ratio:rate1h > (14.4 * 0.01)\n          and\n          course:service_error_ratio:rate5m > (14.4 * 0.01)",
     "course:service_error_ratio:rate1h > (14.4 * 0.01)", "CourseErrorBudgetBurnFast"),
    # A queue that is long but steady must not fire (test 7).
    ("vllm:num_requests_waiting > 4 and deriv(vllm:num_requests_waiting[2m]) > 0", "vllm:num_requests_waiting > 4",
     "CourseQueueGrowing"),
    # `for: 30s` on the down alert: firing at once would page on one missed scrape (test 9 at 30 s).
    ("for: 30s", "for: 0s", "CourseServiceDown"),
])
def test_rule_unit_tests_catch_a_broken_rule(tmp_path, old, new, failing):
    text = monitoring.RULES.read_text()
    assert old in text, f"the rule file no longer contains {old!r}: update this test"
    (tmp_path / monitoring.RULES.name).write_text(text.replace(old, new))
    shutil.copy(monitoring.RULE_TESTS, tmp_path)
    done = monitoring.promtool("test", "rules", monitoring.RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0, f"the unit tests did not notice: {new!r}\n{done.stdout}"
    assert failing in done.stdout + done.stderr


def test_every_alert_has_a_severity_and_says_what_is_wrong():
    data = yaml.safe_load(monitoring.RULES.read_text())
    alerts = [r for g in data["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 6
    for rule in alerts:
        assert rule.get("labels", {}).get("severity") in {"page", "ticket"}, rule["alert"]
        assert rule.get("annotations", {}).get("summary") and rule["annotations"].get("description"), rule["alert"]
    tested = yaml.safe_load(monitoring.RULE_TESTS.read_text())
    names = {t["alertname"] for case in tested["tests"] for t in case.get("alert_rule_test", [])}
    assert names == {r["alert"] for r in alerts}, "every alert needs a promtool test case (and only real alerts)"


def test_dashboard_structure():
    dashboard = json.loads(monitoring.DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    for panel in panels:
        assert panel["targets"], f"panel '{panel['title']}' has no query"
        assert panel["datasource"]["uid"] == "${datasource}", f"panel '{panel['title']}' is bound to one datasource"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel '{panel['title']}' has no unit"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
    # The dashboard covers what the issue asks for: latency, throughput, queue, KV cache, errors, saturation.
    wanted = {"vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
              "vllm:generation_tokens_total", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "service_requests_total", "process_cpu_seconds_total"}
    used = set().union(*(monitoring.metric_names(e) for _, _, e in monitoring.dashboard_targets()))
    assert wanted <= used, f"the dashboard does not show {wanted - used}"
    assert "vllm:gpu_cache_usage_perc" not in used, "neither pinned vLLM exports gpu_cache_usage_perc"


def test_metric_names_heuristic():
    assert monitoring.metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="m"}[1m])))'
    ) == {"vllm:time_to_first_token_seconds_bucket"}
    assert monitoring.metric_names('up{job="x"} == 0 or service_ready == 0') == {"up", "service_ready"}
    assert monitoring.metric_names("(sum(rate(a_total{code=~\"5..\"}[5m])) or vector(0)) / sum(rate(a_total[5m]))") \
        == {"a_total"}


def test_write_config(tmp_path):
    path = monitoring.write_config(tmp_path / "p.yml", [monitoring.Job("course-service", "http://127.0.0.1:8123", token="k")],
                                   rule_files=[monitoring.RULES], scrape_interval_s=0.5,
                                   alertmanager_url="http://127.0.0.1:9093")
    config = yaml.safe_load(path.read_text())
    job = config["scrape_configs"][0]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8123"]}]
    assert job["authorization"] == {"type": "Bearer", "credentials": "k"}
    assert config["global"]["scrape_interval"] == "500ms"
    assert config["rule_files"] == [str(monitoring.RULES)]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    if monitoring.promtool_binary():
        done = monitoring.promtool("check", "config", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
