"""Helpers for Lab 2.4 (Production Deployment). Notebook 01: what is inside the service's image, and a
stream in flight while the container is stopped.

Building and running the image come from the package (``inference_course.deploy.images``:
``ensure_service_image``, ``service_container``, ``image_history``, ``podman``); this module holds what the
notebook does with them:

* ``layer_group``/``layer_table``: ``podman history`` as a table, each layer named by what made it
  (the base image, the runtime stage's setup, the virtual environment, the model, metadata);
* ``cached_steps``: how many steps of a ``podman build`` came from the layer cache (its log says so);
* ``sizes_in_image``/``largest_packages``: ``du`` run inside the image, as the image's own user;
* ``wheel_installed_bytes``: what a wheel occupies once installed (the sum of its files, uncompressed);
* ``import_seconds``/``bytecode_files``: how long one Python process takes to import a module, in the image
  or on the host, and whether the image holds compiled bytecode (``.pyc``) for its modules;
* ``parse_size``/``container_memory``: ``podman stats``' human-readable sizes as bytes;
* ``StreamProbe``: one streaming chat completion in a background thread, with the time of every chunk,
  so that the notebook can stop the container under it and see whether it ended whole or was cut.

Notebook 03 (two vLLM replicas behind the vLLM project's router, ``inference_course.servers.vllm_router``):

* ``replica_counters``: each replica's prefix-cache and request counters from its ``/metrics``;
* ``router_samples``: one of the router's own ``vllm_router_*`` metrics, by worker;
* ``run_sessions``: multi-turn chats with the official openai client, optionally with ``X-Session-ID``;
* ``kill_replica``: SIGKILL a replica's process group.

Notebook 04 (rolling updates and autoscaling, with the router's worker list as the Service's endpoints):

* ``router_workers``/``add_worker``/``remove_worker``: the router's ``/list_workers``, ``/add_worker`` and
  ``/remove_worker`` (what Kubernetes' endpoint updates do to a Service);
* ``in_flight``: a replica's running plus waiting requests, from its ``/metrics``;
* ``remove_replica``: take a replica out of service under one of ``ROLLOUT_POLICIES``, timing each step;
* ``failure_kind``: what a failed request's error says happened to it.

(The open-loop load the notebook runs through them is the package's ``bench.OpenLoop``.)
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from inference_course.deploy import images

SITE_PACKAGES = "/opt/venv/lib/python3.11/site-packages"

# What made a layer, recognised in ``podman history``'s "created by" text (first match wins).
_GROUPS = (
    ("model", re.compile(r"COPY .* in /models")),
    ("virtual environment", re.compile(r"COPY .* in /opt/venv")),
    ("the course's code", re.compile(r"COPY .* in /opt/course")),
    ("runtime setup (user, libnuma)", re.compile(r"useradd|apt-get")),
    ("base image (debootstrap)", re.compile(r"ADD file:.* in /\s*$")),
)


def layer_group(created_by: str) -> str:
    """The part of the image a layer belongs to, from the instruction that made it."""
    for name, pattern in _GROUPS:
        if pattern.search(created_by):
            return name
    return "metadata (ENV, USER, CMD, ...)" if "#(nop)" in created_by else "other"


def _instruction(created_by: str, width: int = 90) -> str:
    text = " ".join(created_by.replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", "RUN ").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def layer_table(history: list[dict]):
    """``images.image_history(...)`` as a DataFrame, oldest layer first: instruction, group, MB."""
    import pandas as pd

    rows = [{"instruction": _instruction(row["created_by"]), "group": layer_group(row["created_by"]),
             "MB": row["size_bytes"] / 1e6} for row in reversed(history)]
    return pd.DataFrame(rows)


def cached_steps(build_log: str) -> tuple[int, int]:
    """(steps reused from the layer cache, steps that could be) of one ``podman build`` log: every
    "STEP n/m" but the FROM lines (a FROM starts a stage, it makes no layer) is either rebuilt or
    followed by "--> Using cache"."""
    step = r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: "
    steps = len(re.findall(step, build_log, re.M)) - len(re.findall(step + "FROM ", build_log, re.M))
    cached = len(re.findall(r"^--> Using cache", build_log, re.M))
    return cached, steps


def sizes_in_image(image: str, paths: list[str]) -> dict[str, int]:
    """Bytes under each of ``paths`` inside ``image`` (``du -sb``, one path at a time, so that a folder
    inside another is counted in both; a path that does not exist gives 0)."""
    script = "; ".join(f"du -sb {p} 2>/dev/null || echo '0 {p}'" for p in paths)
    done = images.podman("run", "--rm", "--pull=never", "--entrypoint", "sh", image, "-c", script)
    sizes = {}
    for line in done.stdout.splitlines():
        size, _, path = line.partition("\t") if "\t" in line else line.partition(" ")
        sizes[path.strip()] = int(size)
    return {p: sizes.get(p, 0) for p in paths}


def largest_packages(image: str, n: int = 10) -> list[tuple[str, int]]:
    """The ``n`` largest entries of the image's site-packages, largest first: (name, bytes)."""
    done = images.podman("run", "--rm", "--pull=never", "--entrypoint", "sh", image, "-c",
                         f"du -sb {SITE_PACKAGES}/* | sort -rn | head -n {int(n)}")
    out = []
    for line in done.stdout.splitlines():
        size, path = line.split("\t", 1)
        out.append((Path(path).name, int(size)))
    return out


def wheel_installed_bytes(wheel: str | Path) -> int:
    """What installing ``wheel`` writes: the uncompressed size of its files (a wheel is a zip file)."""
    with zipfile.ZipFile(wheel) as archive:
        return sum(info.file_size for info in archive.infolist())


def import_seconds(module: str, image: str | None = None, *, without_bytecode: bool = False) -> float:
    """Seconds one fresh Python process takes to ``import module``: inside ``image`` (a container with a
    read-only root, as the service runs) or, without ``image``, with this notebook's own interpreter.

    ``without_bytecode`` (in an image): PYTHONPYCACHEPREFIX points Python at an empty folder for its .pyc, so
    it compiles every module it imports from source, as in an image built without them (the image's
    PYTHONDONTWRITEBYTECODE=1 keeps it from writing them there)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    if image:
        env = ["-e", "PYTHONPYCACHEPREFIX=/tmp/no-bytecode-here"] if without_bytecode else []
        done = images.podman("run", "--rm", "--pull=never", "--read-only", *env, "--entrypoint", "python", image,
                             "-c", code)
    else:
        if without_bytecode:
            raise ValueError("without_bytecode is measured in an image: give image=")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              stdin=subprocess.DEVNULL)
    return float(done.stdout.strip().splitlines()[-1])


def bytecode_files(image: str, folder: str = "/opt/venv") -> tuple[int, int, int]:
    """(.py files, .pyc files, bytes of the .pyc) under ``folder`` in ``image``."""
    done = images.podman("run", "--rm", "--pull=never", "--entrypoint", "sh", image, "-c",
                         f"find {folder} -name '*.py' | wc -l; find {folder} -name '*.pyc' | wc -l; "
                         f"find {folder} -name '*.pyc' -printf '%s\\n' | awk '{{s += $1}} END {{printf \"%d\\n\", s}}'")
    py, pyc, pyc_bytes = (int(n) for n in done.stdout.split())
    return py, pyc, pyc_bytes


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> float:
    """'553kB' -> 553000.0, '1.2GiB' -> 1288490188.8 (podman prints decimal units: kB, MB, GB)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = match.group(2).lower() or "b"
    if unit not in _UNITS:
        raise ValueError(f"unknown unit in {text!r}")
    return float(match.group(1)) * _UNITS[unit]


def container_memory(stats: dict) -> tuple[float, float]:
    """(used, limit) bytes from one entry of ``podman stats --no-stream --format json``."""
    used, _, limit = stats["mem_usage"].partition("/")
    return parse_size(used), parse_size(limit)


@dataclass
class StreamProbe:
    """One streaming chat completion in a background thread (``start()``): the monotonic time of every
    content chunk, the usage the server reports at the end (``completion_tokens``), or the error that
    ended it. ``ignore_eos`` makes the model write all ``max_tokens``, so "whole" has one meaning."""

    client: object  # an openai.OpenAI
    max_tokens: int
    model: str = "smollm2"
    prompt: str = "Tell me a long story about a container ship."
    chunk_times: list[float] = field(default_factory=list)
    usage: int | None = None
    error: str | None = None
    ended_at: float | None = None

    def start(self) -> "StreamProbe":
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": self.prompt}], max_tokens=self.max_tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True},
                stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.chunk_times.append(time.monotonic())
                    self._first.set()
                if chunk.usage is not None:
                    self.usage = chunk.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - a cut stream is what the notebook looks at
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self._first.set()

    def wait_for_chunks(self, n: int, timeout: float = 120.0) -> None:
        """Block until ``n`` content chunks arrived (or the stream ended, or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.chunk_times) < n and self.ended_at is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def join(self, timeout: float = 60.0) -> None:
        self._thread.join(timeout)

    @property
    def received(self) -> int:
        """Content chunks received (one token each in vLLM's stream, unless it merged some)."""
        return len(self.chunk_times)

    @property
    def whole(self) -> bool:
        """The server said it sent every token asked for, and nothing went wrong."""
        return self.error is None and self.usage == self.max_tokens

    def decode_rate(self) -> float:
        """Tokens per second between the first and the last chunk (the time to the first one left out)."""
        if len(self.chunk_times) < 2:
            return float("nan")
        return (len(self.chunk_times) - 1) / (self.chunk_times[-1] - self.chunk_times[0])


def drain_lines(log: str) -> list[str]:
    """The service's drain messages in a container's log (what it logs on SIGTERM and after the drain)."""
    return [line.strip() for line in log.splitlines() if "draining" in line or "drained;" in line]


# -- notebook 03: replicas behind a router --------------------------------------------------------------

def replica_counters(urls) -> dict[str, dict[str, float]]:
    """For each replica URL, the counters notebook 03 reads from its ``/metrics`` (vLLM's own names):
    ``hits`` and ``queries`` (prompt tokens found in / looked up in the prefix cache) and ``success``
    (requests finished)."""
    import httpx

    from inference_course.monitoring import metric, scrape

    out = {}
    for url in urls:
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
            samples = scrape(client)
        out[url] = {"hits": metric(samples, "vllm:prefix_cache_hits_total"),
                    "queries": metric(samples, "vllm:prefix_cache_queries_total"),
                    "success": metric(samples, "vllm:request_success_total")}
    return out


def router_samples(router, name: str) -> dict[str, float]:
    """One ``vllm_router_*`` metric of a running router, by its ``worker`` (or ``route``) label."""
    import httpx

    from inference_course.monitoring import scrape

    with httpx.Client(base_url=f"http://127.0.0.1:{router.ports['metrics']}", trust_env=False, timeout=10) as client:
        samples = scrape(client)
    return {labels.get("worker", labels.get("route", "")): value for labels, value in samples.get(name, [])}


async def _session(client, model: str, session_id: str, system: str, turns: int, max_tokens: int,
                   header: bool, rows: list) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: summarize the context in one line."})
        row = {"session": session_id, "turn": turn, "ttft_s": None, "ok": False, "error": None,
               "prompt_tokens": None, "cached_tokens": None}
        rows.append(row)
        started = time.perf_counter()
        text = []
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-ID": session_id} if header else None)
            async for chunk in stream:
                if chunk.usage is not None:  # the last chunk: token counts (cached ones with --enable-prompt-tokens-details)
                    row["prompt_tokens"] = chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    row["cached_tokens"] = details.cached_tokens if details is not None else None
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    if row["ttft_s"] is None:
                        row["ttft_s"] = time.perf_counter() - started
                    text.append(delta)
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001  (the row records what the client saw; the run goes on)
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            return  # a session whose turn failed stops: its next turn would need this answer
        messages.append({"role": "assistant", "content": "".join(text)})


def run_sessions(base_url: str, model: str, systems: dict[str, str], *, turns: int, concurrency: int,
                 max_tokens: int, header: bool = True):
    """Multi-turn chats, one per ``systems`` entry (session id -> system prompt), each turn sent after the
    previous answer arrived, at most ``concurrency`` sessions at a time, with the official openai client
    (streaming; ``X-Session-ID: <session id>`` on every request when ``header``). Every turn's prompt starts
    with the one before it (system prompt, earlier questions and answers): the prefix a cache can reuse.
    Returns a DataFrame: session, turn, ttft_s (time to the first content chunk), ok, error, prompt_tokens and
    cached_tokens (the prompt tokens the replica found in its prefix cache: vLLM reports them in the usage of
    the stream's last chunk when ``vllm serve`` runs with ``--enable-prompt-tokens-details``; else None)."""
    import asyncio

    import httpx
    import pandas as pd
    from openai import AsyncOpenAI

    from inference_course import bench

    async def main():
        http = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(300.0))
        client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="EMPTY", http_client=http, max_retries=0)
        rows: list = []
        gate = asyncio.Semaphore(concurrency)

        async def one(session_id, system):
            async with gate:
                await _session(client, model, session_id, system, turns, max_tokens, header, rows)

        try:
            await asyncio.gather(*(one(sid, text) for sid, text in systems.items()))
        finally:
            await client.close()
        return rows

    rows = bench.run_sync(main)  # works inside a Jupyter cell's running event loop too
    return pd.DataFrame(rows, columns=["session", "turn", "ttft_s", "ok", "error", "prompt_tokens", "cached_tokens"])


def kill_replica(server) -> None:
    """SIGKILL a replica's whole process group (the API server and its EngineCore): a node or pod that dies
    without any chance to clean up."""
    os.killpg(server.pid, signal.SIGKILL)


NGINX_CONF = Path(__file__).with_name("nginx") / "replicas.conf"


def nginx_router(urls, *, balance: str = "least_conn;", work_dir: str | Path | None = None):
    """nginx in front of the replicas at ``urls``, configured from ``nginx/replicas.conf`` (the file to read:
    this only fills in its placeholders). ``balance`` is the upstream's balancing directive (``least_conn;``,
    ``hash $http_x_session_id consistent;``, or ``""`` for nginx's default round robin). Returns a
    ``ManagedServer`` (not started); its access log, one line per request with the replica that answered, is
    ``server.access_log``. Raises ``ServerError`` with the fix when nginx is not installed."""
    import shutil
    import tempfile

    from inference_course.servers import ManagedServer, ServerError, free_port

    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if binary is None:
        raise ServerError("nginx is not installed. Fix: `sudo apt-get install nginx-light` (Debian/Ubuntu) or "
                          "`brew install nginx` (macOS); the notebook skips the nginx run without it.")
    work = Path(work_dir or tempfile.mkdtemp(prefix="lab24-nginx-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    servers = "\n        ".join(f"server {url.split('://', 1)[-1].rstrip('/')};" for url in urls)
    conf = (NGINX_CONF.read_text().replace("@WORK@", str(work)).replace("@PORT@", str(port))
            .replace("@BALANCE@", balance).replace("@SERVERS@", servers))
    (work / "nginx.conf").write_text(conf)
    server = ManagedServer("nginx", [binary, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"],
                           port=port, ready_path="/nginx-health", startup_timeout=30)
    server.access_log = work / "access.log"
    return server


def nginx_upstream_counts(access_log: str | Path) -> dict[str, int]:
    """Requests nginx's access log says each replica answered with 200, by replica URL."""
    counts: dict[str, int] = {}
    path = Path(access_log)
    for line in path.read_text().splitlines() if path.exists() else []:
        status, _, upstreams = (line.split(" ", 2) + ["", ""])[:3]  # "$status $request_time $upstream_addr"
        if status == "200" and upstreams:
            url = "http://" + upstreams.split(",")[-1].strip()  # "a, b" when nginx tried two replicas: b answered
            counts[url] = counts.get(url, 0) + 1
    return counts


# -- notebook 04: rolling updates and autoscaling ---------------------------------------------------------

ROLLOUT_POLICIES = {
    "kill now": "SIGTERM to a replica started with --shutdown-timeout 0 (vLLM's default); the balancer "
                "drops it lag_s later",
    "drain only": "SIGTERM to a replica started with --shutdown-timeout > 0 (requests in flight finish); the "
                  "balancer drops it lag_s later",
    "deregister, wait, drain": "the balancer drops it first; lag_s later (a preStop sleep) SIGTERM, with drain",
}


def _router_call(router, method: str, path: str, **params):
    import httpx

    response = httpx.request(method, router.url + path, params=params, trust_env=False, timeout=10)
    if response.status_code != 200:
        raise RuntimeError(f"vllm-router {method} {path} {params}: HTTP {response.status_code} {response.text[:200]}")
    return response


def router_workers(router) -> list[str]:
    """The worker URLs the router sends requests to (``GET /list_workers``)."""
    return list(_router_call(router, "GET", "/list_workers").json().get("urls", []))


def add_worker(router, url: str) -> None:
    """Add a worker to the router (``POST /add_worker?url=``): a new pod's endpoint joining the Service once
    it is ready."""
    _router_call(router, "POST", "/add_worker", url=url)


def remove_worker(router, url: str) -> None:
    """Remove a worker from the router (``POST /remove_worker?url=``): a terminating pod's endpoint leaving
    the Service. Requests already sent to it go on."""
    _router_call(router, "POST", "/remove_worker", url=url)


def in_flight(url: str) -> int:
    """Requests a replica holds right now: ``vllm:num_requests_running`` + ``vllm:num_requests_waiting``."""
    import httpx

    from inference_course.monitoring import metric, scrape

    with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
        samples = scrape(client)
    return int(metric(samples, "vllm:num_requests_running") + metric(samples, "vllm:num_requests_waiting"))


def _listening(url: str) -> bool:
    import httpx

    try:
        httpx.get(url + "/health", trust_env=False, timeout=1)
        return True
    except httpx.TransportError:
        return False


def remove_replica(router, replica, policy: str, *, lag_s: float, origin: float, grace_s: float = 30.0) -> dict:
    """Take ``replica`` (a running ``vllm_server``) out of service the way ``policy`` (a key of
    ``ROLLOUT_POLICIES``) says, as Kubernetes deletes a pod: SIGTERM goes to the API server's process only
    (the kubelet signals a container's PID 1), and ``grace_s`` after it (``terminationGracePeriodSeconds``,
    30 s by default) whatever still runs gets SIGKILL. The router plays the Service; ``lag_s`` is the time
    an endpoint change takes to reach it.

    Returns the times of each step in seconds from ``origin`` (a ``time.perf_counter()`` value): ``signal``,
    ``removed`` (from the router), ``closed`` (its port stopped accepting connections), ``exited`` (None when
    it did not exit by itself) and ``sigkill`` (None when it was not needed); ``in_flight``, the requests it
    held just before the signal; ``exit_code``."""
    if policy not in ROLLOUT_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {list(ROLLOUT_POLICIES)}")
    events: dict = {"policy": policy, "sigkill": None}

    def now() -> float:
        return time.perf_counter() - origin

    remover = None
    if policy == "deregister, wait, drain":
        remove_worker(router, replica.url)
        events["removed"] = now()
        time.sleep(lag_s)  # the preStop sleep: endpoint changes reach every balancer before the signal
    else:
        def remove_later():
            time.sleep(lag_s)
            remove_worker(router, replica.url)
            events["removed"] = now()

        remover = threading.Thread(target=remove_later, daemon=True)
    events["in_flight"] = in_flight(replica.url)
    os.kill(replica.pid, signal.SIGTERM)
    signalled = time.monotonic()
    events["signal"] = now()
    if remover is not None:
        remover.start()
    while replica.running() and time.monotonic() < signalled + grace_s:
        if "closed" not in events and not _listening(replica.url):
            events["closed"] = now()
        time.sleep(0.05)
    events["exited"] = None if replica.running() else now()
    if replica.running():  # the grace period is over: the kubelet's SIGKILL, to everything in the container
        kill_replica(replica)
        events["sigkill"] = now()
    events.setdefault("closed", now())
    events["exit_code"] = replica.stop()  # reaps the process group
    if remover is not None:
        remover.join(timeout=lag_s + 15)
    return events


def failure_kind(error: str | None) -> str:
    """What a failed request's error (``bench.RequestResult.error``) says happened to it."""
    if not error:
        return "ok"
    if "cannot schedule new futures after shutdown" in error:
        return "HTTP 500: sent to a replica that is shutting down"
    if "EngineCore encountered an issue" in error or "connection broke during the request" in error:
        return "aborted mid-answer: the replica stopped"
    if "error sending request for url" in error or error.startswith(("HTTP 502", "HTTP 503")):
        return "the balancer could not reach the replica"
    if "ended without any token chunk" in error:
        return "answer ended before its first token"
    return "other: " + error[:80]
