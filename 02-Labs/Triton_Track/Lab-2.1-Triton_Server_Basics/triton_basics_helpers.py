"""What only Lab 2.1 (Triton Server Basics) teaches, written to be read.

* the lab's model repository is real files, ``model_repository/<model>/config.pbtxt`` and
  ``<model>/<version>/model.py`` beside this module (``MODEL_REPOSITORY``); the writers below copy a model
  from it into a run's repository with ``inference_course.triton.copy_model``, filling in per-run values;
* ``config_pbtxt``: a model's ``config.pbtxt`` built from Python values, one field per line;
* the lab's PyTorch model (``build_mlp``), served by Triton's Python backend with a ``model.py`` that
  handles a whole dynamic batch in one forward pass (``write_mlp_model``);
* the broken model repositories of notebook 02 (``write_broken_models``), copies of ``self_describing``;
* the TorchScript artifact that the ``pytorch_libtorch`` backend of NVIDIA's container would serve
  (``export_torchscript``, ``write_libtorch_model``);
* readers for what the server reports: statistics (``stats_summary``, ``batch_stats``), Prometheus
  metrics (``metric_samples``) and perf_analyzer's CSV (``perf_analyzer_command``, ``read_perf_analyzer_csv``).

The server itself comes from ``inference_course.triton`` (binary, ports, start/stop).
"""
from __future__ import annotations

import json
from pathlib import Path

from inference_course import triton

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"


def model_file(model: str, filename: str = "config.pbtxt", version: int | None = None) -> str:
    """The text of a file of the lab's model repository, e.g. ``model_file("mlp", "model.py", 1)``."""
    folder = MODEL_REPOSITORY / model
    return ((folder / str(version)) if version is not None else folder).joinpath(filename).read_text()


# -- config.pbtxt -----------------------------------------------------------------------------------


def tensor(name: str, data_type: str, dims, **extra) -> dict:
    """One input or output of a model config: name, TYPE_* data type, dims (-1 = variable size)."""
    spec = {"name": name, "data_type": data_type, "dims": list(dims)}
    spec.update(extra)
    return spec


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (value.startswith("TYPE_") or value.startswith("KIND_")):
        return value  # enum values are written bare
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[ " + ", ".join(_value(v) for v in value) + " ]"
    if isinstance(value, dict):
        return "{ " + " ".join(f"{k}: {_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def config_pbtxt(*, backend: str | None = None, platform: str | None = None, name: str | None = None,
                 max_batch_size: int = 0, inputs=(), outputs=(), instance_count: int | None = None,
                 kind: str = "KIND_CPU", gpus=None, dynamic_batching: dict | bool | None = None,
                 version_policy: str | None = None, parameters: dict | None = None) -> str:
    """A ``config.pbtxt`` (protobuf text format of Triton's ModelConfig).

    ``dynamic_batching``: ``True`` for the defaults, or a dict such as
    ``{"max_queue_delay_microseconds": 500, "preferred_batch_size": [4, 8]}``.
    ``version_policy``: the body of the policy, e.g. ``"latest { num_versions: 2 }"``, ``"all { }"`` or
    ``"specific { versions: [1, 3] }"``. ``parameters``: string key/values the model reads at start.
    """
    if not backend and not platform:
        raise ValueError("give backend (e.g. 'python') or platform (e.g. 'pytorch_libtorch')")
    lines = []
    if name:
        lines.append(f"name: {_value(name)}")
    if backend:
        lines.append(f"backend: {_value(backend)}")
    if platform:
        lines.append(f"platform: {_value(platform)}")
    lines.append(f"max_batch_size: {max_batch_size}")
    if version_policy:
        lines.append(f"version_policy: {{ {version_policy} }}")
    for key, specs in (("input", inputs), ("output", outputs)):
        if specs:
            body = ",\n".join(f"  {_value(spec)}" for spec in specs)
            lines.append(f"{key} [\n{body}\n]")
    if instance_count is not None:
        group = {"kind": kind, "count": instance_count}
        if gpus is not None:
            group["gpus"] = list(gpus)
        lines.append(f"instance_group [ {_value(group)} ]")
    if dynamic_batching:
        body = "" if dynamic_batching is True else " ".join(
            f"{k}: {_value(v)}" for k, v in dynamic_batching.items())
        lines.append(f"dynamic_batching {{ {body} }}".replace("{  }", "{ }"))
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: {_value(key)} value: {{ string_value: {_value(str(value))} }} }}')
    return "\n".join(lines) + "\n"


def write_model_dir(repository, name: str, config: str, files: dict | None = None,
                    versions=(1,)) -> Path:
    """``<repository>/<name>/config.pbtxt`` and, in every version folder, ``files`` (name -> text or bytes)."""
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config)
    for version in versions:
        folder = model_dir / str(version)
        folder.mkdir(exist_ok=True)
        for filename, content in (files or {}).items():
            target = folder / filename
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
    return model_dir


tree = triton.tree  # the package's listing of a model repository (shared by the Triton labs)


# -- the lab's PyTorch model ------------------------------------------------------------------------

IN_FEATURES = 64
NUM_CLASSES = 10


def build_mlp(in_features: int, hidden: int, out_features: int):
    """A three-layer MLP classifier (logits out); model_repository/mlp/1/model.py holds the same function."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, out_features),
    )


def make_mlp(hidden: int, seed: int = 0, in_features: int = IN_FEATURES, out_features: int = NUM_CLASSES):
    """The lab's model with weights fixed by ``seed``, in eval mode."""
    import torch

    torch.manual_seed(seed)
    return build_mlp(in_features, hidden, out_features).eval()


def mlp_model_py() -> str:
    """The MLP's model.py (``model_repository/mlp/1/model.py``): ``build_mlp`` is in it, self-contained."""
    return model_file("mlp", "model.py", 1)


def _group(device: str, instance_count: int) -> str:
    """The instance_group line: KIND_GPU on GPU 0 when ``device`` is cuda, else KIND_CPU."""
    on_gpu = device.startswith("cuda")
    body = f"kind: {'KIND_GPU' if on_gpu else 'KIND_CPU'} count: {instance_count}" + (" gpus: [ 0 ]" if on_gpu else "")
    return f"instance_group [ {{ {body} }} ]"


def _shape_changes(max_batch_size: int, in_features: int, out_features: int) -> dict:
    return {
        "max_batch_size: 32\n": f"max_batch_size: {max_batch_size}\n",
        'name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ]': f'name: "INPUT__0" data_type: TYPE_FP32 dims: [ {in_features} ]',
        'name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ]': f'name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {out_features} ]',
    }


def _mlp_changes(*, hidden: int, device: str = "cpu", max_batch_size: int = 32, instance_count: int = 1,
                 dynamic_batching: dict | bool | None = None, in_features: int = IN_FEATURES,
                 out_features: int = NUM_CLASSES) -> dict:
    """What differs from ``model_repository/mlp/config.pbtxt``: ``parameters`` and ``replace`` for
    ``triton.copy_model``. ``dynamic_batching``: True for the defaults or a dict of its fields."""
    group_line = _group(device, instance_count)
    if dynamic_batching:
        body = "" if dynamic_batching is True else " ".join(
            f"{k}: {_value(v)}" for k, v in dynamic_batching.items())
        group_line += "\n" + f"dynamic_batching {{ {body} }}".replace("{  }", "{ }")
    replace = _shape_changes(max_batch_size, in_features, out_features)
    replace["instance_group [ { kind: KIND_CPU count: 1 } ]"] = group_line
    parameters = {"in_features": in_features, "hidden": hidden, "out_features": out_features}
    return {"parameters": parameters, "replace": replace}


def mlp_config(**kw) -> str:
    """config.pbtxt of the MLP: ``model_repository/mlp/config.pbtxt`` with ``_mlp_changes(**kw)`` applied."""
    return triton.substitute(model_file("mlp"), **_mlp_changes(**kw))


def write_mlp_model(repository, name: str, model, **config_kw) -> Path:
    """Copy ``model_repository/mlp`` to ``<repository>/<name>`` with this model's sizes and ``config_kw``
    filled in, and save its weights as ``1/weights.pt`` (a state_dict) beside ``1/model.py``."""
    import torch

    first, last = model[0], model[-1]
    changes = _mlp_changes(hidden=first.out_features, in_features=first.in_features,
                           out_features=last.out_features, **config_kw)
    model_dir = triton.copy_model(MODEL_REPOSITORY, "mlp", repository, name=name, **changes)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_dir / "1" / "weights.pt")
    return model_dir


# -- the TorchScript artifact for the pytorch_libtorch backend ----------------------------------------


def export_torchscript(model, example, path) -> Path:
    """``torch.jit.trace`` the model on ``example`` and save it (the file the libtorch backend loads)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    traced.save(str(path))
    return path


def _libtorch_changes(*, max_batch_size: int = 32, in_features: int = IN_FEATURES,
                      out_features: int = NUM_CLASSES, device: str = "cpu", instance_count: int = 1) -> dict:
    replace = _shape_changes(max_batch_size, in_features, out_features)
    replace["instance_group [ { kind: KIND_CPU count: 1 } ]"] = _group(device, instance_count)
    return {"replace": replace}


def libtorch_config(**kw) -> str:
    """config.pbtxt for ``platform: "pytorch_libtorch"`` (``model_repository/mlp_libtorch/config.pbtxt``
    with ``kw`` filled in). TorchScript has no tensor names, so the backend maps inputs and outputs by
    position through the naming convention INPUT__<i> / OUTPUT__<i>."""
    return triton.substitute(model_file("mlp_libtorch"), **_libtorch_changes(**kw))


def write_libtorch_model(repository, name: str, model, example, **config_kw) -> Path:
    """Copy ``model_repository/mlp_libtorch`` to ``<repository>/<name>`` and export ``1/model.pt``
    (TorchScript) into it, ready for NGC's Triton image."""
    first, last = model[0], model[-1]
    model_dir = triton.copy_model(MODEL_REPOSITORY, "mlp_libtorch", repository, name=name, **_libtorch_changes(
        in_features=first.in_features, out_features=last.out_features, **config_kw))
    export_torchscript(model, example, model_dir / "1" / "model.pt")
    return model_dir


# -- broken repositories (notebook 02) ----------------------------------------------------------------

# model_repository/self_describing: a Python model that declares what it expects in auto_complete_config,
# as the ONNX Runtime or TensorRT backends read it from the model file: with auto-complete on, Triton
# checks config.pbtxt against it.
SELF_DESCRIBING_MODEL_PY = model_file("self_describing", "model.py", 1)

BROKEN_MODELS = {
    "dims_mismatch": "config.pbtxt says dims [3]; the model expects [4]",
    "missing_version": "config.pbtxt but no version folder (1/, 2/, ...)",
    "wrong_backend": 'backend: "pyhton" (a typo of python)',
}

# What each broken copy changes in self_describing (copy_model's arguments; versions {} = no version folder).
BROKEN_CHANGES = {
    "dims_mismatch": {"replace": {'name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ]':
                                  'name: "INPUT0" data_type: TYPE_FP32 dims: [ 3 ]'}},
    "missing_version": {"versions": {}},
    "wrong_backend": {"replace": {'backend: "python"': 'backend: "pyhton"'}},
}


def write_broken_models(repository) -> dict[str, Path]:
    """The three broken models of notebook 02: copies of ``model_repository/self_describing``, each with
    one change (``BROKEN_CHANGES``)."""
    made = {name: triton.copy_model(MODEL_REPOSITORY, "self_describing", repository, name=name, **changes)
            for name, changes in BROKEN_CHANGES.items()}
    # missing_version: the file is there, one level too high
    (made["missing_version"] / "model.py").write_text(SELF_DESCRIBING_MODEL_PY)
    return made


# -- what the server reports --------------------------------------------------------------------------

_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def stats_summary(model_stats: dict) -> dict:
    """One model version's statistics (an entry of ``get_inference_statistics()["model_stats"]``) as
    counts and average milliseconds per request for each server-side phase."""
    infer = model_stats["inference_stats"]
    success = int(infer["success"]["count"])
    out = {"model": model_stats["name"], "version": model_stats["version"],
           "requests": success, "failed": int(infer["fail"]["count"]),
           "inference_count": int(model_stats["inference_count"]),
           "execution_count": int(model_stats["execution_count"])}
    for phase in _PHASES:
        count = int(infer[phase]["count"])
        out[f"{phase}_ms"] = int(infer[phase]["ns"]) / count / 1e6 if count else 0.0
    out["avg_batch"] = out["inference_count"] / out["execution_count"] if out["execution_count"] else 0.0
    return out


def batch_stats(model_stats: dict) -> dict[int, int]:
    """Executions per batch size: how many times the model ran with 1, 2, 3 ... rows."""
    return {int(entry["batch_size"]): int(entry["compute_infer"]["count"])
            for entry in model_stats.get("batch_stats", [])}


def metric_samples(text: str, prefix: str = "nv_") -> list[dict]:
    """Prometheus text exposition parsed with prometheus_client: one dict per sample."""
    from prometheus_client.parser import text_string_to_metric_families

    rows = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefix):
            continue
        for sample in family.samples:
            rows.append({"family": family.name, "type": family.type, "sample": sample.name,
                         "labels": dict(sample.labels), "value": sample.value})
    return rows


# -- perf_analyzer ------------------------------------------------------------------------------------


def perf_analyzer_command(model: str, url: str, csv_path, *, protocol: str = "grpc", concurrency: int = 1,
                          measurement_interval_ms: int = 3000, max_trials: int = 6, stability_percentage: int = 20,
                          batch_size: int = 1, binary: str = "perf_analyzer") -> list[str]:
    """A perf_analyzer (2.60) command: closed loop at one concurrency, results as CSV (latencies in usec).

    perf_analyzer repeats measurement windows until three in a row agree within
    ``stability_percentage`` (its default 10 % is hard to reach on a small, busy machine), at most
    ``max_trials`` windows; without a stable result it writes no CSV.
    """
    return [binary, "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(measurement_interval_ms), "--max-trials", str(max_trials),
            "--stability-percentage", str(stability_percentage), "-f", str(csv_path)]


def read_perf_analyzer_csv(path):
    """perf_analyzer's ``-f`` CSV as a DataFrame in the course's units: concurrency, throughput_rps,
    p50_ms / p90_ms / p95_ms / p99_ms (perf_analyzer writes microseconds), and the server-side parts."""
    import re

    import pandas as pd

    raw = pd.read_csv(path)
    out = pd.DataFrame({"concurrency": raw["Concurrency"].astype(int),
                        "throughput_rps": raw["Inferences/Second"].astype(float)})
    for column in raw.columns:
        match = re.fullmatch(r"p(\d+) latency", column.strip())
        if match:
            out[f"p{match.group(1)}_ms"] = raw[column].astype(float) / 1000
    if "Avg latency" in raw:
        out["mean_ms"] = raw["Avg latency"].astype(float) / 1000
    for column in ("Server Queue", "Server Compute Infer"):
        if column in raw:
            out[column.lower().replace(" ", "_") + "_ms"] = raw[column].astype(float) / 1000
    return out.sort_values("concurrency").reset_index(drop=True)


# -- a versioned model (notebook 02) ------------------------------------------------------------------

# model_repository/scaler/1/model.py: every version folder holds the same file; the version number decides
# the factor, so a response tells which version answered.
SCALER_MODEL_PY = model_file("scaler", "model.py", 1)


def ready_versions(client, model: str) -> list[int]:
    """The versions of ``model`` that are READY, from the repository index."""
    return sorted(int(entry["version"]) for entry in client.get_model_repository_index()
                  if entry.get("name") == model and entry.get("state") == "READY" and "version" in entry)
