import io
import subprocess
import sys

from inference_course import doctor


def test_doctor_passes_on_this_machine_without_the_engine():
    """Every check but the vLLM one (test_models runs that engine) passes here."""
    proc = subprocess.run([sys.executable, "-m", "inference_course", "doctor", "--skip", "vllm"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("hardware", "versions", "model", "FastAPI hello", "Triton server"):
        assert any(line.startswith("✔ PASS") and step in line for line in proc.stdout.splitlines()), proc.stdout
    assert "{'status': 'ok'}" in proc.stdout
    assert "doubler([0.0, 1.0, 2.0, 3.0]) = [0.0, 2.0, 4.0, 6.0]" in proc.stdout


def test_forced_gpu_profile_without_gpu_fails_with_fix(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "gpu")
    monkeypatch.setattr(doctor.profiles, "cuda_available", lambda: False)
    check = doctor.check_hardware()
    assert check.verdict == doctor.FAIL and "COURSE_PROFILE" in check.fix


def test_torch_cpu_build_on_a_gpu_machine_is_diagnosed(monkeypatch):
    import torch

    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {"driver_cuda": "12.4", "gpus": ["NVIDIA H100"]})
    monkeypatch.setattr(torch.version, "cuda", None)  # what a +cpu build reports
    check = doctor.check_versions()
    assert check.verdict == doctor.FAIL and "CPU build" in check.detail and "gpu" in check.fix


def test_cuda_build_newer_than_the_driver_is_diagnosed(monkeypatch):
    import torch

    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {"driver_cuda": "12.2", "gpus": ["NVIDIA A10"]})
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check = doctor.check_versions()
    assert check.verdict == doctor.FAIL and "CUDA 13.0" in check.detail and "<= 12.2" in check.fix


def test_missing_triton_binary_says_how_to_install(monkeypatch):
    import inference_course.triton as triton

    monkeypatch.delenv(triton.ENV_BINARY, raising=False)
    monkeypatch.setattr(triton, "pytriton_root", lambda: None)
    monkeypatch.setattr(triton.shutil, "which", lambda name: None)
    check = doctor.check_triton()
    assert check.verdict == doctor.FAIL and "server binary missing" in check.detail
    assert "pip install --no-deps nvidia-pytriton==0.7.0" in check.fix and "tritonserver:24.08-py3" in check.fix


def test_vllm_failure_hints():
    from inference_course.profiles import CPU

    assert "gpu_memory_utilization" in doctor._vllm_fix("RuntimeError: CUDA out of memory", CPU)
    assert "gpu_memory_utilization" in doctor._vllm_fix(
        "RuntimeError: Available memory on node 0 (6.59/9.09 GiB) on kv cache allocation is less", CPU)
    assert "uninstall" in doctor._vllm_fix("operator torchvision::nms does not exist", CPU)
    # A normal start log mentions the KV cache and CUDA; a later, unrelated error is not "out of memory".
    normal = "INFO CPU KV cache size: 20,480 tokens\nINFO using CUDA driver 580\nTypeError: bad argument"
    assert doctor._vllm_fix(normal, CPU).startswith("read the log lines above")


def test_invalid_profile_is_a_failed_check_not_a_crash(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tpu")
    for key in ("versions", "model", "vllm", "fastapi", "triton"):
        monkeypatch.setitem(doctor.STEPS, key, lambda key=key: doctor.Check(key, doctor.PASS, "fine"))
    out = io.StringIO()
    results = doctor.run(stream=out)
    assert results[0].verdict == doctor.FAIL and "cpu or gpu" in results[0].fix


def test_run_prints_a_verdict_per_step_and_skips(monkeypatch):
    for key in doctor.STEPS:
        monkeypatch.setitem(doctor.STEPS, key, lambda key=key: doctor.Check(key, doctor.PASS, "fine"))
    out = io.StringIO()
    results = doctor.run(skip=("vllm", "triton"), stream=out)
    assert [r.verdict for r in results].count(doctor.SKIP) == 2
    assert "all checks passed" in out.getvalue()
