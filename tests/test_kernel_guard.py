"""Nothing a notebook kernel started survives the kernel: ``notebooks.setup()`` guards the kernel's
process group, tried the way the problem was found (a kernel started with jupyter_client, children
started from it, then the kernel SIGKILLed)."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

# A child that itself starts a grandchild, both with multiprocessing's spawn method, like vLLM's
# EngineCore and its Worker; both only sleep.
CHILDREN = r"""
import multiprocessing as mp, time

def grandchild():
    time.sleep(600)

def child(queue):
    g = mp.get_context("spawn").Process(target=grandchild)
    g.start()
    queue.put(g.pid)
    time.sleep(600)

def start():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    c = ctx.Process(target=child, args=(queue,))
    c.start()
    print("PIDS", c.pid, queue.get(timeout=60))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _run(client, code: str, timeout: float = 120) -> str:
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("ERROR " + msg["content"]["ename"] + ": " + msg["content"]["evalue"])

    client.execute_interactive(code, timeout=timeout, output_hook=hook)
    return "".join(out)


@pytest.mark.parametrize("guarded", [True, False])
def test_children_of_a_killed_kernel_are_ended(guarded, tmp_path):
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    manager.start_kernel(cwd=str(tmp_path))
    pids = []
    try:
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=120)
        if guarded:
            out = _run(client, "from inference_course.notebooks import setup\nP = setup(quiet=True)\n"
                               "from inference_course.notebooks import _KERNEL_GUARD\nprint('GUARD', _KERNEL_GUARD.pid)")
            assert "GUARD" in out, out
        (tmp_path / "kernel_children.py").write_text(CHILDREN)
        out = _run(client, f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
                           "import kernel_children\nkernel_children.start()")
        assert "PIDS" in out, out
        pids = [int(p) for p in out.split("PIDS", 1)[1].split()[:2]]
        assert all(_alive(p) for p in pids)
        kernel_pid = manager.provisioner.pid
        os.kill(kernel_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        survivors = [p for p in pids if _alive(p)]
        if guarded:
            assert not survivors, f"processes {survivors} outlived the killed kernel"
        else:  # the control: without the guard the children do survive (what the guard is for)
            assert survivors == pids, "without the guard the children were expected to survive"
        client.stop_channels()
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            manager.shutdown_kernel(now=True)
        except Exception:
            pass
