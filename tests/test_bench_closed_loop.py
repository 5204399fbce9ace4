"""The closed-loop load driver of inference_course.bench, against callables with known behaviour."""
import threading
import time

import pytest

from inference_course import bench


def sleeper(seconds):
    def make_call():
        return lambda: time.sleep(seconds)
    return make_call


def test_closed_loop_counts_requests_and_measures_latency():
    result = bench.closed_loop(sleeper(0.02), 4, num_requests=40)
    assert len(result.latencies_s) == 40 and result.errors == []
    assert min(result.latencies_s) >= 0.02
    # 4 workers x 20 ms each: 10 rounds of at least 20 ms, so at most 200 req/s
    assert 0.2 <= result.duration_s < 2.0
    assert result.throughput_rps <= 4 / 0.02 + 1e-9
    summary = result.summary()
    assert summary["requests"] == 40 and summary["errors"] == 0
    assert 20 <= summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]


def test_concurrency_raises_throughput_of_a_sleeping_server():
    one = bench.closed_loop(sleeper(0.02), 1, num_requests=20).throughput_rps
    eight = bench.closed_loop(sleeper(0.02), 8, num_requests=80).throughput_rps
    assert eight > 4 * one


def test_each_worker_gets_its_own_call_and_warms_up():
    created, calls = [], []

    def make_call():
        created.append(threading.get_ident())
        return lambda: calls.append(threading.get_ident())

    result = bench.closed_loop(make_call, 3, num_requests=9, warmup=2)
    assert len(set(created)) == 3
    assert len(calls) == 9 + 3 * 2          # warm-up requests are sent but not measured
    assert len(result.latencies_s) == 9


def test_failures_are_recorded_and_kept_out_of_latencies():
    counter = iter(range(10**6))
    lock = threading.Lock()

    def make_call():
        def call():
            with lock:
                n = next(counter)
            if n % 3 == 0:
                raise ConnectionError(f"refused #{n}")
        return call

    result = bench.closed_loop(make_call, 2, num_requests=30)
    assert len(result.errors) == 10 and len(result.latencies_s) == 20
    assert result.errors[0].startswith("ConnectionError: refused")
    assert result.summary()["errors"] == 10


def test_max_errors_stops_the_run_early():
    def make_call():
        def call():
            raise RuntimeError("down")
        return call

    result = bench.closed_loop(make_call, 2, num_requests=1000, max_errors=5)
    assert 5 <= len(result.errors) < 1000


def test_duration_mode_stops_on_time():
    result = bench.closed_loop(sleeper(0.01), 2, duration_s=0.3)
    assert 0.3 <= result.duration_s < 1.5
    assert len(result.latencies_s) > 10


def test_setup_failure_is_raised_with_its_cause():
    def make_call():
        raise OSError("cannot connect")

    with pytest.raises(RuntimeError, match="cannot connect"):
        bench.closed_loop(make_call, 3, num_requests=5)


@pytest.mark.parametrize("kw", [{}, {"num_requests": 5, "duration_s": 1.0}])
def test_exactly_one_stopping_rule(kw):
    with pytest.raises(ValueError, match="exactly one"):
        bench.closed_loop(sleeper(0), 1, **kw)


def test_load_sweep_and_plot():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    df = bench.load_sweep(sleeper(0.005), [1, 2], num_requests=10, progress=False)
    assert list(df["concurrency"]) == [1, 2]
    assert {"throughput_rps", "p50_ms", "p95_ms", "p99_ms", "errors"} <= set(df.columns)
    df["config"] = "a"
    both = pd.concat([df, df.assign(config="b")], ignore_index=True)
    fig = bench.plot_load_sweep(both, by="config", title="t")
    throughput_axis, latency_axis = fig.axes
    assert len(throughput_axis.lines) == 2 and len(latency_axis.lines) == 6
