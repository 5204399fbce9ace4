"""Lab 2.5's helpers: histogram arithmetic checked against worked examples and against Prometheus itself."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "02-Labs/vLLM_Track/Lab-2.5-Performance_Monitoring"))
import performance_monitoring_helpers as H  # noqa: E402

PAGE = """# HELP lat Latency.
# TYPE lat histogram
lat_bucket{le="0.1",model="a"} 2
lat_bucket{le="0.5",model="a"} 6
lat_bucket{le="1.0",model="a"} 8
lat_bucket{le="+Inf",model="a"} 10
lat_count{model="a"} 10
lat_sum{model="a"} 7.5
lat_bucket{le="0.1",model="b"} 1
lat_bucket{le="0.5",model="b"} 1
lat_bucket{le="1.0",model="b"} 1
lat_bucket{le="+Inf",model="b"} 1
lat_count{model="b"} 1
lat_sum{model="b"} 0.05
# HELP reqs_total Requests.
# TYPE reqs_total counter
reqs_total{code="200"} 5
reqs_total{code="500"} 1
"""


def Client(text):  # noqa: N802 - reads like the class it returns
    """An httpx client whose every GET answers ``text`` (httpx's own MockTransport)."""
    return httpx.Client(base_url="http://metrics.test",
                        transport=httpx.MockTransport(lambda request: httpx.Response(200, text=text)))


def test_families_lists_types_labels_series_and_buckets():
    by = {f["name"]: f for f in H.families(PAGE)}
    assert by["lat"]["type"] == "histogram" and by["lat"]["labels"] == ["model"] and by["lat"]["series"] == 2
    assert by["lat"]["buckets"] == [0.1, 0.5, 1.0, math.inf]
    assert by["reqs"]["type"] == "counter" and by["reqs"]["labels"] == ["code"] and by["reqs"]["series"] == 2 and by["reqs"]["buckets"] == []
    assert list(H.inventory(PAGE).name) == ["lat", "reqs"]


def test_histogram_sums_matching_series_and_delta_subtracts():
    samples = H.scrape(Client(PAGE))
    assert H.histogram(samples, "lat", model="a") == [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 10)]
    assert H.histogram(samples, "lat") == [(0.1, 3), (0.5, 7), (1.0, 9), (math.inf, 11)]
    later = H.scrape(Client(PAGE.replace('lat_bucket{le="+Inf",model="a"} 10', 'lat_bucket{le="+Inf",model="a"} 13')))
    assert H.histogram_delta(samples, later, "lat", model="a") == [(0.1, 0), (0.5, 0), (1.0, 0), (math.inf, 3)]
    with pytest.raises(KeyError, match="lat"):
        H.histogram(samples, "latency")
    # A labelled series that appears between the scrapes started from 0.
    newer = H.scrape(Client(PAGE.replace('model="b"', 'model="c"')))
    assert H.histogram_delta(samples, newer, "lat", model="c") == [(0.1, 1), (0.5, 1), (1.0, 1), (math.inf, 1)]


@pytest.mark.parametrize("q, expected", [
    (0.5, 0.1 + 0.4 * (5 - 2) / 4),     # rank 5 in (0.1, 0.5]: 3 of its 4
    (0.1, 0.1 * 1 / 2),                 # rank 1 in the first bucket: from 0
    (0.8, 1.0),                         # rank 8 exactly at the top of (0.5, 1]
    (0.95, 1.0),                        # rank 9.5 in +Inf: the largest finite bound
    (0.0, 0.0),
])
def test_bucket_quantile_worked_examples(q, expected):
    buckets = [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 10)]
    assert H.bucket_quantile(q, buckets) == pytest.approx(expected)


def test_bucket_quantile_edges_and_bounds():
    assert math.isnan(H.bucket_quantile(0.5, [(0.1, 0), (math.inf, 0)]))
    assert math.isnan(H.bucket_quantile(0.5, [(0.1, 3)]))      # no +Inf bucket
    assert math.isnan(H.bucket_quantile(0.0, [(0.1, 0), (0.2, 3), (math.inf, 3)]))  # 0/0 in an empty first bucket
    assert H.bucket_quantile(-0.1, [(0.1, 1), (math.inf, 1)]) == -math.inf
    assert H.bucket_quantile(1.5, [(0.1, 1), (math.inf, 1)]) == math.inf
    buckets = [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 10)]
    assert H.bucket_bounds(0.5, buckets) == (0.1, 0.5)
    assert H.bucket_bounds(0.1, buckets) == (0.0, 0.1)
    assert H.bucket_bounds(0.95, buckets) == (1.0, math.inf)
    assert all(math.isnan(x) for x in H.bucket_bounds(0.5, [(0.1, 0), (math.inf, 0)]))


def test_bucket_quantile_agrees_with_promtool(tmp_path):
    """The same buckets through Prometheus' own histogram_quantile (promtool's rule-test evaluator)."""
    from inference_course import monitoring

    if not monitoring.promtool_binary():
        pytest.skip("promtool is not installed")
    buckets = [(0.001, 0), (0.02, 3), (0.06, 11), (0.25, 40), (1.0, 47), (math.inf, 50)]
    series = "\n".join(f"      - series: 'h_bucket{{le=\"{'+Inf' if math.isinf(le) else le}\"}}'\n"
                       f"        values: '0+{count}x10'" for le, count in buckets)
    cases = []
    for q in (0.1, 0.5, 0.9, 0.95, 0.99):
        cases.append(f"      - expr: histogram_quantile({q}, sum by (le) (increase(h_bucket[10m])))\n"
                     f"        eval_time: 10m\n        exp_samples:\n          - labels: '{{}}'\n"
                     f"            value: {H.bucket_quantile(q, buckets)!r}")
    (tmp_path / "rules.yml").write_text("groups: []\n")
    (tmp_path / "test.yml").write_text("rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n"
                                       "    input_series:\n" + series + "\n    promql_expr_test:\n" + "\n".join(cases) + "\n")
    result = monitoring.promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compare_with_nvidia_smi_verdicts():
    """Made-up readings of one GPU: the exporter inside nvidia-smi's before/after range widened by the tolerance
    agrees, outside it differs, and a GPU the exporter did not report is NaN and differs."""
    smi = {"index": 0.0, "uuid": "GPU-a", "name": "NVIDIA H200", "memory.total": 143771.0}
    before = [{**smi, "memory.used": 130_000.0, "utilization.gpu": 0.0, "power.draw": 120.0}]
    after = [{**smi, "memory.used": 130_010.0, "utilization.gpu": 4.0, "power.draw": 126.0}]
    labels = {"gpu": "0", "UUID": "GPU-a"}
    page = {"DCGM_FI_DEV_FB_USED": [(labels, 130_004.0)], "DCGM_FI_DEV_GPU_UTIL": [(labels, 30.0)],
            "DCGM_FI_DEV_POWER_USAGE": [(labels, 137.0)]}
    table = H.compare_with_nvidia_smi(page, before, after).set_index("quantity")
    assert table.loc["memory used (MiB)", "tolerance"] == pytest.approx(1437.71)
    assert bool(table.loc["memory used (MiB)", "agrees"])
    assert not bool(table.loc["utilization (%)", "agrees"])   # 30 is more than 20 points above 0..4
    assert bool(table.loc["power (W)", "agrees"])             # 137 <= 126 + max(12.6, 10)
    page["DCGM_FI_DEV_FB_USED"] = [(labels, 128_000.0)]       # 2,000 MiB below: more than 1% of 143,771 MiB
    page["DCGM_FI_DEV_POWER_USAGE"] = [({"UUID": "GPU-other"}, 126.0)]
    table = H.compare_with_nvidia_smi(page, before, after).set_index("quantity")
    assert not bool(table.loc["memory used (MiB)", "agrees"])
    assert math.isnan(table.loc["power (W)", "exporter"]) and not bool(table.loc["power (W)", "agrees"])
