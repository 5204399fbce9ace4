import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from inference_course import servers
from inference_course.servers import ManagedServer, ServerError, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def _http_server(port: int) -> ManagedServer:
    return ManagedServer("http.server", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                         port=port, startup_timeout=20)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_context_manager_serves_then_stops():
    port = free_port()
    with _http_server(port) as server:
        assert server.running()
        with urllib.request.urlopen(server.url + "/", timeout=5) as response:
            assert response.status == 200
        pid = server.pid
        assert server in servers.running_servers()
    assert _wait_dead(pid, 5)
    assert server not in servers.running_servers()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores to pin to one of them")
def test_cpus_pins_the_server_and_the_processes_it_starts_later(tmp_path):
    core = max(os.sched_getaffinity(0))
    # The child is started after a delay, as vLLM starts its EngineCore after its imports.
    script = tmp_path / "spawn.py"
    script.write_text(textwrap.dedent("""
        import subprocess, sys, time
        time.sleep(0.5)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("child", child.pid, flush=True)
        import http.server
        http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind="127.0.0.1")
    """))
    port = free_port()
    server = ManagedServer("spawner", [sys.executable, str(script), str(port)], port=port, startup_timeout=20,
                           cpus=[core])
    with server:
        assert os.sched_getaffinity(server.pid) == {core}
        child = int(next(line.split()[1] for line in server.log_path.read_text().splitlines()
                         if line.startswith("child ")))
        assert os.sched_getaffinity(child) == {core}
    assert os.sched_getaffinity(0) != {core}, "pinning the server must not pin the caller"


def test_stop_kills_the_whole_process_group(tmp_path):
    # A "server" that starts a grandchild which ignores SIGTERM, like engine worker processes can.
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time, http.server, threading
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        open({str(tmp_path / 'child.pid')!r}, "w").write(str(child.pid))
        http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
    """))
    port = free_port()
    server = ManagedServer("parent", [sys.executable, str(script), str(port)], port=port, startup_timeout=20)
    with server:
        child = int((tmp_path / "child.pid").read_text())
        assert _alive(child)
    assert not _alive(child), "a grandchild that ignores SIGTERM survived stop()"
    assert servers.group_members(server.pid) == []


def test_exit_before_ready_raises_with_the_log_tail():
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('config error: model_repository missing'); sys.exit(3)"]
    with pytest.raises(ServerError) as info:
        with ManagedServer("broken", cmd, port=port, startup_timeout=20):
            pass
    assert "exited with code 3" in str(info.value)
    assert "model_repository missing" in str(info.value)


def test_readiness_timeout_raises_and_stops_the_process():
    port = free_port()
    cmd = [sys.executable, "-c", "import time; print('still loading weights', flush=True); time.sleep(600)"]
    server = ManagedServer("slow", cmd, port=port, startup_timeout=2)
    with pytest.raises(ServerError, match="not ready after 2 s") as info:
        with server:
            pass
    assert "still loading weights" in str(info.value)
    assert not server.running()


def test_missing_binary_is_a_clear_error():
    with pytest.raises(ServerError, match="Is it installed"):
        ManagedServer("nothing", ["/no/such/binary"], port=free_port()).start()


@pytest.mark.parametrize("how", ["sigkill", "exception"])
def test_no_server_outlives_a_crashed_parent(tmp_path, how):
    """The parent (standing in for a notebook kernel) dies; its server must die with it."""
    pid_file = tmp_path / "server.pid"
    crash = "os.kill(os.getpid(), signal.SIGKILL)" if how == "sigkill" else "raise RuntimeError('cell failed')"
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from inference_course.servers import ManagedServer, free_port
        port = free_port()
        server = ManagedServer("http.server", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                               port=port).start().wait_ready(20)
        open({str(pid_file)!r}, "w").write(str(server.pid))
        {crash}
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    server_pid = int(pid_file.read_text())
    assert _wait_dead(server_pid, 20), f"server {server_pid} outlived its parent ({how})"


def test_prometheus_server_starts_when_installed(tmp_path):
    if not servers.prometheus_binary():
        with pytest.raises(ServerError, match="apt-get install prometheus"):
            servers.prometheus_server(tmp_path / "p.yml")
        pytest.skip("prometheus is not installed here (apt-get install prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs: []\n")
    with servers.prometheus_server(config) as server:
        with urllib.request.urlopen(server.url + "/api/v1/status/buildinfo", timeout=5) as response:
            assert b'"version"' in response.read()
    assert not server.running()


def test_run_isolated_timeout_kills_the_whole_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(600)")
    with pytest.raises(subprocess.TimeoutExpired):
        servers.run_isolated([sys.executable, "-c", code], timeout=5)
    assert not _alive(int(pid_file.read_text())), "run_isolated left a grandchild running after its timeout"


def test_run_isolated_returns_output_and_code():
    proc = servers.run_isolated([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"],
                                timeout=30)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr.strip()) == (4, "out", "err")


def test_reaper_exits_after_a_normal_stop():
    port = free_port()
    server = _http_server(port).start().wait_ready(20)
    reaper = server._reaper
    server.stop()
    assert reaper.poll() is not None, "the reaper outlived a normal stop"


def test_readiness_ignores_proxy_settings(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with _http_server(free_port()) as server:
        assert servers.http_ok(server.url + "/")


def test_vllm_server_with_an_api_key_reads_readiness_from_health():
    # /v1/models answers 401 once a key is set: waiting for it would never end.
    from inference_course.servers import vllm_server

    assert vllm_server("m", port=1).ready_path == "/v1/models"
    assert vllm_server("m", port=1, extra_args=["--api-key", "k"]).ready_path == "/health"
    assert vllm_server("m", port=1, env={"VLLM_API_KEY": "k"}).ready_path == "/health"
