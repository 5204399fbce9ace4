"""bench against a real HTTP server: a small FastAPI app that streams like an OpenAI-compatible server
(SSE ``data: {json}`` events, a final usage chunk on request, ``data: [DONE]``), with known delays."""
import asyncio
import gc
import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from inference_course import bench, servers
from inference_course.bench import RequestResult

FIRST_TOKEN_S = 0.05
PER_TOKEN_S = 0.01

# The behaviour of one request is chosen by words in its model name: "no-usage" (never send a usage
# chunk), "pairs" (two tokens per chunk, as a server with a stream interval of 2 sends them), "slow"
# (a token every 0.1 s). A prompt containing "please-fail" gets an HTTP 500.
# In-flight counts are kept per model name, so that each test reads only its own requests.
FAKE_SERVER = textwrap.dedent('''
    import asyncio, json, os, time
    from collections import defaultdict

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    FIRST_TOKEN_S = float(os.environ["FAKE_FIRST_TOKEN_S"])
    PER_TOKEN_S = float(os.environ["FAKE_PER_TOKEN_S"])
    app = FastAPI()
    IN_FLIGHT = defaultdict(int)
    MAX_IN_FLIGHT = defaultdict(int)
    REQUESTS = defaultdict(int)
    LAST_BODY = {}


    @app.get("/health")
    async def health():
        return {"ok": True}


    @app.get("/stats")
    async def stats():
        return {"in_flight": IN_FLIGHT, "max_in_flight": MAX_IN_FLIGHT, "requests": REQUESTS,
                "last_body": LAST_BODY}


    def sse(obj):
        return "data: " + json.dumps(obj) + "\\n\\n"


    async def serve(request: Request, chat: bool):
        body = await request.json()
        model = body["model"]
        REQUESTS[model] += 1
        LAST_BODY[model] = body
        if chat:
            text = " ".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))
        else:
            text = body["prompt"]
        if "please-fail" in text:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error",
                                           "param": None, "code": 500}}, status_code=500)
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "only stream=True", "type": "invalid_request_error",
                                           "param": None, "code": 400}}, status_code=400)
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        usage = bool((body.get("stream_options") or {}).get("include_usage")) and "no-usage" not in model
        per_token = 0.1 if "slow" in model else PER_TOKEN_S
        per_chunk = 2 if "pairs" in model else 1
        prompt_tokens = len(text.split())
        rid, created = f"req-{REQUESTS[model]}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        IN_FLIGHT[model] += 1
        MAX_IN_FLIGHT[model] = max(MAX_IN_FLIGHT[model], IN_FLIGHT[model])

        async def events():
            counted = True
            try:
                await asyncio.sleep(FIRST_TOKEN_S)
                chunks = -(-n // per_chunk)
                for i in range(chunks):
                    if i:
                        await asyncio.sleep(per_token)
                    finish = "length" if i == chunks - 1 else None
                    if chat:
                        if i == 0:  # like vLLM: an opening chunk with the role only
                            yield sse({"id": rid, "object": kind, "created": created, "model": model,
                                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                        choice = {"index": 0, "delta": {"content": f" tok{i}" * per_chunk}, "logprobs": None,
                                  "finish_reason": finish}
                    else:
                        choice = {"index": 0, "text": f" tok{i}" * per_chunk, "logprobs": None,
                                  "finish_reason": finish}
                    yield sse({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})
                if usage:
                    yield sse({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                         "total_tokens": prompt_tokens + n}})
                # Leave the in-flight count before the client can see the end of the stream.
                IN_FLIGHT[model] -= 1
                counted = False
                yield "data: [DONE]\\n\\n"
            finally:
                if counted:
                    IN_FLIGHT[model] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)


    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_openai")
    (folder / "fake_openai.py").write_text(FAKE_SERVER)
    env = {"FAKE_FIRST_TOKEN_S": str(FIRST_TOKEN_S), "FAKE_PER_TOKEN_S": str(PER_TOKEN_S)}
    with servers.uvicorn_server("fake_openai:app", app_dir=folder, ready_path="/health", env=env,
                                extra_args=["--log-level", "warning", "--no-access-log"]) as running:
        # The server's first streamed answer pays for its lazy imports: keep that out of the tests.
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            data = json.dumps({"model": "warm-up", "max_tokens": 2, "stream": True, **body}).encode()
            request = urllib.request.Request(running.url + path, data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert b"data: [DONE]" in response.read()
        yield running


def stats(server) -> dict:
    with urllib.request.urlopen(server.url + "/stats", timeout=5) as response:
        return json.loads(response.read())


def prompts(n: int, words: int = 3) -> list[str]:
    return [" ".join(f"w{i}" for _ in range(words)) for i in range(n)]


def max_overlap(results) -> int:
    """Most requests whose [start, start + latency) intervals overlap, from the client's records."""
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


# -- against the server -----------------------------------------------------------------------------

def test_completions_latencies_tokens_and_concurrency(server):
    max_tokens, concurrency = 10, 4
    frozen_before = gc.get_freeze_count()  # vLLM, if imported in this process, freezes its own heap
    started = time.perf_counter()
    results, duration = bench.run(server.url, "m-completions", prompts(12, words=5), concurrency=concurrency,
                                  max_tokens=max_tokens)
    outside = time.perf_counter() - started
    assert len(results) == 12 and all(r.ok for r in results), [r.error for r in results]
    assert all(r.output_tokens == max_tokens and r.prompt_tokens == 5 for r in results)
    assert all(len(r.itl) == max_tokens - 1 for r in results)
    for r in results:  # e2e latency ends at the last token chunk
        assert r.latency == pytest.approx(r.ttft + sum(r.itl), abs=1e-9)

    s = bench.summarize(results, duration)
    assert FIRST_TOKEN_S * 1000 <= s["median_ttft_ms"] < FIRST_TOKEN_S * 1000 + 40
    assert PER_TOKEN_S * 1000 - 1 <= s["median_itl_ms"] < PER_TOKEN_S * 1000 + 6
    assert PER_TOKEN_S * 1000 - 1 <= s["median_tpot_ms"] < PER_TOKEN_S * 1000 + 6
    # Three waves of four requests, each ~50 ms + 9 x 10 ms.
    one = FIRST_TOKEN_S + (max_tokens - 1) * PER_TOKEN_S
    assert 3 * one <= duration < 3 * one + 0.25
    assert max(r.start + r.latency for r in results) <= duration <= outside
    assert s["total_output_tokens"] == 12 * max_tokens
    assert s["output_throughput"] == pytest.approx(12 * max_tokens / duration)
    assert 0.6 * 12 * max_tokens / (3 * one) < s["output_throughput"] <= 12 * max_tokens / (3 * one)
    assert s["request_throughput"] == pytest.approx(12 / duration)

    seen = stats(server)
    assert seen["max_in_flight"]["m-completions"] == concurrency
    assert seen["requests"]["m-completions"] == 12
    assert max_overlap(results) <= concurrency
    body = seen["last_body"]["m-completions"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["max_tokens"] == max_tokens
    assert gc.get_freeze_count() == frozen_before  # the run's own freeze is given back to the collector


@pytest.mark.parametrize("concurrency", [1, 3])
def test_in_flight_never_exceeds_concurrency(server, concurrency):
    model = f"m-limit-{concurrency}"
    results, _ = bench.run(server.url, model, prompts(3 * concurrency + 1), concurrency=concurrency, max_tokens=4)
    assert all(r.ok for r in results)
    assert stats(server)["max_in_flight"][model] == concurrency
    assert max_overlap(results) <= concurrency


def test_chat_messages_and_strings(server):
    messages = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}], "x y"]
    results, duration = bench.run(server.url + "/v1", "m-chat", messages, api="chat", concurrency=2, max_tokens=6)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.prompt_tokens for r in results] == [5, 2]
    assert all(r.output_tokens == 6 for r in results)
    # vLLM's rule: the role-only opening chunk is a token chunk, so 7 chunks give 6 gaps.
    assert all(len(r.itl) == 6 for r in results)
    assert all(FIRST_TOKEN_S <= r.ttft < FIRST_TOKEN_S + 0.04 for r in results), [r.ttft for r in results]
    body = stats(server)["last_body"]["m-chat"]
    assert body["max_completion_tokens"] == 6 and body["messages"][-1]["role"] == "user"


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_output_tokens_without_usage_count_text_chunks(server, api):
    results, _ = bench.run(server.url, f"m-no-usage-{api}", prompts(2), api=api, concurrency=2, max_tokens=7)
    assert all(r.ok for r in results)
    assert [r.output_tokens for r in results] == [7, 7]
    assert [r.prompt_tokens for r in results] == [None, None]


def test_failures_are_counted_not_raised(server):
    batch = prompts(6)
    batch[1] = "please-fail now"
    batch[4] = "also please-fail"
    results, duration = bench.run(server.url, "m-fail", batch, concurrency=3, max_tokens=5)
    assert [r.ok for r in results] == [True, False, True, True, False, True]
    assert all("HTTP 500" in r.error and "injected failure" in r.error for r in results if not r.ok)
    assert stats(server)["requests"]["m-fail"] == 6  # no retries
    s = bench.summarize(results, duration)
    assert (s["requests"], s["completed"], s["failed"]) == (6, 4, 2)
    assert s["total_output_tokens"] == 4 * 5
    assert s["output_throughput"] == pytest.approx(20 / duration)
    assert s["median_ttft_ms"] >= FIRST_TOKEN_S * 1000  # failures (answered at once) are not in the stats


def test_output_tokens_come_from_usage_and_itl_is_per_chunk(server):
    results, _ = bench.run(server.url, "m-pairs", prompts(2), concurrency=2, max_tokens=8)
    assert all(r.ok for r in results)
    assert [r.output_tokens for r in results] == [8, 8]  # 4 chunks of 2 tokens: usage is what counts
    assert [len(r.itl) for r in results] == [3, 3]


def test_timeout_bounds_the_whole_request_and_unreachable_server_fails(server):
    # A token every 0.1 s: no single read waits 0.3 s, the request as a whole (2 s) exceeds it.
    started = time.perf_counter()
    results, _ = bench.run(server.url, "m-slow", prompts(2), concurrency=2, max_tokens=20, timeout=0.3)
    assert time.perf_counter() - started < 1.5
    assert all(not r.ok and "timeout" in r.error for r in results)
    assert all(FIRST_TOKEN_S <= r.ttft < 0.3 and 0.3 <= r.latency < 0.5 for r in results)

    nowhere = f"http://127.0.0.1:{servers.free_port()}"
    results, duration = bench.run(nowhere, "m", prompts(3), concurrency=2, max_tokens=3, timeout=5)
    assert all(not r.ok and "connection" in r.error for r in results)
    s = bench.summarize(results, duration)
    assert s["failed"] == 3 and s["output_throughput"] == 0 and np.isnan(s["p99_ttft_ms"])


def test_request_rate_spreads_arrivals_deterministically(server):
    rate, n = 20.0, 6
    schedule = bench.poisson_arrivals(n, rate, seed=1)
    assert np.array_equal(schedule, bench.poisson_arrivals(n, rate, seed=1))
    assert not np.allclose(schedule, bench.poisson_arrivals(n, rate, seed=2))
    assert np.all(np.diff(schedule) > 0) and schedule[-1] == pytest.approx(n / rate)

    results, duration = bench.run(server.url, "m-rate", prompts(n), concurrency=n, max_tokens=3,
                                  request_rate=rate, seed=1)
    starts = np.array([r.start for r in results])
    lag = starts - schedule  # sleeping wakes late, never early; a busy CI machine adds tens of ms
    assert np.all(lag >= -0.002) and np.all(lag < 0.1) and np.median(lag) < 0.03, (starts, schedule)
    assert duration >= n / rate

    results, _ = bench.run(server.url, "m-rate", prompts(n), concurrency=n, max_tokens=3)
    assert max(r.start for r in results) < 0.03


def test_explicit_arrivals_from_an_origin(server):
    """A ramp's send times, measured from an origin the caller took before the run (as Lab 2.4/04 does)."""
    schedule = [0.25, 0.30, 0.45]
    # The first run in a process pays ~0.2 s of one-time setup before its first send (seen when this test ran
    # alone): warm up, so that the lag below measures the scheduling only
    bench.run(server.url, "m-ramp", prompts(1), concurrency=1, max_tokens=1)
    origin = time.perf_counter()
    time.sleep(0.2)  # the run begins after the origin: the first arrival is 0.05 s away, not 0.25
    results, duration = bench.run(server.url, "m-ramp", prompts(3), concurrency=3, max_tokens=3,
                                  arrivals=schedule, origin=origin)
    lag = np.array([r.start for r in results]) - np.array(schedule)
    assert np.all(lag >= -0.002) and np.all(lag < 0.1), lag
    assert duration >= schedule[-1]
    with pytest.raises(ValueError, match="one per prompt"):
        bench.run(server.url, "m-ramp", prompts(2), concurrency=2, max_tokens=3, arrivals=[0.0])


def test_open_loop_follows_its_rate_until_stopped(server):
    """bench.OpenLoop: no arrivals while the rate is 0, about rate x time after; nothing new once stopped."""
    origin = time.perf_counter()
    load = bench.OpenLoop(server.url, "m-open", lambda n, seed: prompts(n), lambda t: 0.0 if t < 0.5 else 40.0,
                          origin=origin, chunk_s=0.25, seed=3, max_tokens=2).start()
    time.sleep(1.5)
    results = load.stop()
    stopped = time.perf_counter() - origin
    starts = [r.start for r in results]
    assert starts == sorted(starts) and all(r.ok for r in results)
    assert min(starts) >= 0.5  # the first chunks had a rate of 0
    assert 15 <= len(results) <= 70, len(results)  # ~40 req/s for ~1 s (Poisson)
    assert max(starts) < stopped + 0.3  # no chunk began after stop()


def test_run_inside_a_running_event_loop(server, capsys):
    async def notebook_cell():  # a Jupyter cell runs while the kernel's event loop is running
        asyncio.get_running_loop()
        return bench.run(server.url, "m-loop", prompts(3), concurrency=3, max_tokens=4, progress=True)

    results, duration = asyncio.run(notebook_cell())
    assert all(r.ok and r.output_tokens == 4 for r in results)
    assert duration > FIRST_TOKEN_S
    assert "3/3" in capsys.readouterr().err  # the progress bar counted every request


def test_first_run_of_a_fresh_process_warms_up_elsewhere_and_measures_the_same(server):
    # A fresh process pays first-use costs on its first request; the warm-up pays them against a local
    # socket. Behaviour, not a timing threshold: the benchmarked server sees only the workload, and the
    # first run's TTFT is as plausible as the second's.
    code = textwrap.dedent("""
        import json, statistics, sys
        from inference_course import bench
        medians = []
        for _ in range(2):
            results, _ = bench.run(sys.argv[1], "m-fresh", ["a", "b", "c"], api="chat", concurrency=3, max_tokens=3)
            assert all(r.ok for r in results), [r.error for r in results]
            medians.append(statistics.median(r.ttft for r in results))
        print(json.dumps(medians))
    """)
    done = subprocess.run([sys.executable, "-c", code, server.url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats(server)["requests"]["m-fresh"] == 6
    assert FIRST_TOKEN_S <= first < 1.0 and FIRST_TOKEN_S <= second < 1.0, (first, second)


def test_sweep_and_plot(server):
    df = bench.sweep(server.url, "m-sweep", prompts(4), [1, 2, 4], max_tokens=5, percentiles=(50, 99))
    assert list(df["concurrency"]) == [1, 2, 4]
    assert list(df["failed"]) == [0, 0, 0] and list(df["total_output_tokens"]) == [20, 20, 20]
    throughput = df["output_throughput"].to_numpy()
    assert throughput[1] > 1.5 * throughput[0] and throughput[2] > 1.5 * throughput[1]
    assert {"p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms"} <= set(df.columns)
    assert "p90_ttft_ms" not in df.columns

    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    fig = bench.plot_sweep(df, title="fake server")
    try:
        assert isinstance(fig, Figure) and len(fig.axes) == 3
        assert all(ax.get_xscale() == "log" for ax in fig.axes)
        assert [len(ax.get_lines()) for ax in fig.axes] == [1, 2, 2]
        assert list(fig.axes[1].get_lines()[1].get_ydata()) == list(df["p99_ttft_ms"])
    finally:
        plt.close(fig)


# -- summarize on hand-made results -----------------------------------------------------------------

def handmade() -> list[RequestResult]:
    return [
        RequestResult(True, 10, 5, 0.00, 0.120, 0.200, [0.020, 0.020, 0.015, 0.025]),
        RequestResult(True, 12, 4, 0.01, 0.080, 0.170, [0.030, 0.030, 0.030]),
        RequestResult(True, 8, 1, 0.02, 0.300, 0.300, []),          # one token: no TPOT
        RequestResult(True, None, 3, 0.05, 0.050, 0.111, [0.061, 0.000]),
        RequestResult(False, None, 0, 0.06, None, 9.0, [], "HTTP 500: boom"),
        RequestResult(False, None, 2, 0.07, 5.0, 60.0, [1.0], "timeout"),
    ]


def test_summarize_matches_numpy():
    results, duration = handmade(), 2.5
    s = bench.summarize(results, duration, percentiles=(50, 90, 95, 99, 99.9))
    ok = results[:4]
    ttft = [r.ttft for r in ok]
    e2e = [r.latency for r in ok]
    itl = [g for r in ok for g in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    assert len(tpot) == 3 and len(itl) == 9
    for name, values in {"ttft": ttft, "e2e": e2e, "itl": itl, "tpot": tpot}.items():
        assert s[f"mean_{name}_ms"] == np.mean(values) * 1000
        assert s[f"median_{name}_ms"] == np.median(values) * 1000
        for p in (50, 90, 95, 99, 99.9):
            assert s[f"p{p:g}_{name}_ms"] == np.percentile(values, p) * 1000, (name, p)
    assert (s["requests"], s["completed"], s["failed"]) == (6, 4, 2)
    assert s["total_output_tokens"] == 13 and s["total_input_tokens"] == 30
    assert s["output_throughput"] == 13 / duration and s["request_throughput"] == 4 / duration
    assert "p99.9_ttft_ms" in s and "p75_ttft_ms" not in s


def test_summarize_with_nothing_successful():
    s = bench.summarize(handmade()[4:], 1.0)
    assert (s["requests"], s["failed"], s["total_output_tokens"]) == (2, 2, 0)
    assert all(np.isnan(s[f"{stat}_{m}_ms"]) for stat in ("mean", "median", "p99") for m in bench.METRICS)


def test_format_summary_reads_like_vllm_bench():
    text = bench.format_summary(bench.summarize(handmade(), 2.5))
    assert "Output token throughput (tok/s)" in text and "Median TTFT (ms)" in text and "P99 ITL (ms)" in text
    assert "5.20" in text  # 13 tokens / 2.5 s


def test_bad_arguments_are_refused_before_sending():
    with pytest.raises(ValueError, match="api"):
        bench.run("http://127.0.0.1:9", "m", ["x"], concurrency=1, max_tokens=1, api="responses")
    with pytest.raises(ValueError, match="concurrency"):
        bench.run("http://127.0.0.1:9", "m", ["x"], concurrency=0, max_tokens=1)
    with pytest.raises(ValueError, match="chat"):
        bench.run("http://127.0.0.1:9", "m", [[{"role": "user", "content": "x"}]], concurrency=1, max_tokens=1)
