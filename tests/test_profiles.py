import pytest

from inference_course import profiles


def test_forced_profile_wins(monkeypatch):
    monkeypatch.setenv(profiles.ENV_PROFILE, "gpu")
    assert profiles.get_profile().name == "gpu"
    monkeypatch.setenv(profiles.ENV_PROFILE, "CPU")
    assert profiles.get_profile().name == "cpu"


def test_unknown_profile_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv(profiles.ENV_PROFILE, "tpu")
    with pytest.raises(ValueError, match="cpu, gpu"):
        profiles.get_profile()


def test_detection_follows_cuda(monkeypatch):
    monkeypatch.delenv(profiles.ENV_PROFILE, raising=False)
    monkeypatch.setattr(profiles, "cuda_available", lambda: True)
    assert profiles.detect_profile_name() == "gpu"
    monkeypatch.setattr(profiles, "cuda_available", lambda: False)
    assert profiles.detect_profile_name() == "cpu"


def test_cpu_profile_uses_float32_and_small_sizes():
    cpu, gpu = profiles.CPU, profiles.GPU
    assert cpu.vllm_dtype == "float32"  # bfloat16 ran 6x slower on the AVX2-only CI CPU
    assert cpu.enforce_eager and not gpu.enforce_eager
    assert max(cpu.batch_sizes) < max(gpu.batch_sizes)
    assert cpu.num_prompts < gpu.num_prompts
    assert cpu.notebook_budget_s <= gpu.notebook_budget_s
    assert gpu.speed_shape == "llama-3.1-8b" and cpu.speed_shape is None


def test_serve_args_mirror_engine_kwargs():
    args = profiles.CPU.vllm_serve_args(max_model_len=512)
    assert args[args.index("--dtype") + 1] == "float32"
    assert args[args.index("--max-model-len") + 1] == "512"
    assert "--enforce-eager" in args
    assert "--enforce-eager" not in profiles.GPU.vllm_serve_args()


def test_serving_kv_cache_is_fixed_on_cpu_only():
    # cpu: a fixed 1 GiB KV cache, passed through to vllm serve as a flag; gpu: the profile's sizing
    assert profiles.CPU.serving_engine_kwargs() == {"kv_cache_memory_bytes": 2**30}
    assert profiles.GPU.serving_engine_kwargs() == {}
    args = profiles.CPU.vllm_serve_args(**profiles.CPU.serving_engine_kwargs())
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(2**30)
    assert "--kv-cache-memory-bytes" not in profiles.GPU.vllm_serve_args(**profiles.GPU.serving_engine_kwargs())


def test_system_info_names_the_machine():
    info = profiles.system_info(profiles.CPU)
    assert info["profile"] == "cpu" and info["cpu_cores"] >= 1
    assert "torch" in info["versions"] and "vllm" in info["versions"]


def test_nvidia_driver_version_reads_nvidia_smi(tmp_path, monkeypatch):
    from inference_course.profiles import nvidia_driver_version

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=driver_version ] && printf '580.159.04\\n580.159.04\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_driver_version() == "580.159.04"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert nvidia_driver_version() is None
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert nvidia_driver_version() is None
