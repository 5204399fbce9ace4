"""Alertmanager and the OTLP receiver the course uses, against the real tools (no engine needed):

- the course's Alertmanager file passes `amtool check-config`, routes pages and tickets where it says, and
  write_alertmanager_config changes only the webhook URL and the timings asked for;
- a real Alertmanager notifies the course's WebhookReceiver of an alert posted to its API, and of its
  resolution (send_resolved), with the timings write_alertmanager_config set;
- a real OTLP exporter (opentelemetry-sdk, gRPC) delivers a span to SpanSink with its attributes and parent.
"""
from __future__ import annotations

import datetime as dt
import time

import httpx
import pytest
import yaml

from inference_course import monitoring, servers

needs_am = pytest.mark.skipif(not servers.alertmanager_binary() or not monitoring.shutil.which("amtool"),
                              reason="alertmanager is not installed (apt-get install prometheus-alertmanager)")


@needs_am
def test_the_course_alertmanager_file_is_valid_and_routes_as_documented(tmp_path):
    check = monitoring.amtool("check-config", str(monitoring.ALERTMANAGER))
    assert check.returncode == 0, check.stdout + check.stderr
    for labels, receiver in ((["alertname=CourseServiceDown", "severity=page"], "course-webhook"),
                             (["alertname=CourseTTFTHigh", "severity=ticket"], "course-webhook")):
        routed = monitoring.amtool("config", "routes", "test", f"--config.file={monitoring.ALERTMANAGER}", *labels)
        assert routed.returncode == 0 and routed.stdout.strip() == receiver, routed.stdout + routed.stderr


@needs_am
def test_write_alertmanager_config_changes_only_the_url_and_the_timings(tmp_path):
    original = yaml.safe_load(monitoring.ALERTMANAGER.read_text())
    written = monitoring.write_alertmanager_config(tmp_path / "am.yml", "http://127.0.0.1:9/hook",
                                                   group_wait_s=0.5, group_interval_s=2)
    config = yaml.safe_load(written.read_text())
    assert config["receivers"][0]["webhook_configs"][0]["url"] == "http://127.0.0.1:9/hook"
    assert config["route"]["group_wait"] == "500ms" and config["route"]["group_interval"] == "2s"
    assert config["route"]["repeat_interval"] == original["route"]["repeat_interval"]   # not asked: unchanged
    # The page route sets its own group_wait: retimed too; it sets no group_interval: none added.
    assert config["route"]["routes"][0]["group_wait"] == "500ms" and "group_interval" not in config["route"]["routes"][0]
    assert config["inhibit_rules"] == original["inhibit_rules"]
    check = monitoring.amtool("check-config", str(written))
    assert check.returncode == 0, check.stdout + check.stderr


@needs_am
def test_alertmanager_notifies_the_webhook_of_firing_and_resolved(tmp_path):
    with monitoring.WebhookReceiver() as hook:
        config = monitoring.write_alertmanager_config(tmp_path / "am.yml", hook.url, group_wait_s=0.2,
                                                      group_interval_s=1)
        with servers.alertmanager_server(config, data_dir=tmp_path / "data") as am:
            now = dt.datetime.now(dt.timezone.utc)
            alert = {"labels": {"alertname": "CourseServiceDown", "severity": "page", "instance": "test"},
                     "annotations": {"summary": "test alert"}, "startsAt": now.isoformat()}
            sent = time.time()
            httpx.post(am.url + "/api/v2/alerts", json=[alert], timeout=10, trust_env=False).raise_for_status()
            firing = hook.wait_for(lambda n: n["status"] == "firing", timeout=30)
            assert firing["receiver"] == "course-webhook"
            assert [a["labels"]["alertname"] for a in firing["alerts"]] == ["CourseServiceDown"]
            assert firing["received"] - sent < 10
            assert [a["labels"]["alertname"] for a in monitoring.alertmanager_alerts(am.url)] == ["CourseServiceDown"]
            alert["endsAt"] = dt.datetime.now(dt.timezone.utc).isoformat()
            httpx.post(am.url + "/api/v2/alerts", json=[alert], timeout=10, trust_env=False).raise_for_status()
            resolved = hook.wait_for(lambda n: n["status"] == "resolved", timeout=30)
            assert resolved["alerts"][0]["labels"]["alertname"] == "CourseServiceDown"
    with pytest.raises(TimeoutError, match="firing"):  # the message names what did arrive
        hook.wait_for(lambda n: n["status"] == "never", timeout=0.1)


def test_span_sink_receives_a_real_otlp_export():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    with monitoring.SpanSink() as sink:
        provider = TracerProvider(resource=Resource.create({"service.name": "course-test"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sink.endpoint, insecure=True)))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("outer") as outer:
            with tracer.start_as_current_span("inner") as inner:
                inner.set_attribute("gen_ai.usage.completion_tokens", 7)
                inner.set_attribute("tags", ["a", "b"])
        provider.shutdown()
        got = sink.wait_for(lambda s: s["name"] == "inner", timeout=20)
        parent = sink.wait_for(lambda s: s["name"] == "outer", timeout=20)
    assert got["attributes"] == {"gen_ai.usage.completion_tokens": 7, "tags": ["a", "b"]}
    assert got["parent_span_id"] == parent["span_id"] == format(outer.get_span_context().span_id, "016x")
    assert got["trace_id"] == parent["trace_id"] and parent["parent_span_id"] is None
    assert got["service"] == "course-test" and parent["start"] <= got["start"] <= got["end"] <= parent["end"]
