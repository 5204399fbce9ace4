"""What only Lab 2.3 (Backend Integration) teaches, written to be read.

* the lab's model repository is real files beside this module (``MODEL_REPOSITORY``): four Python-backend
  models that run the same CNN with four runtimes (``py_torch_eager``, ``py_torchscript``,
  ``py_onnxruntime``, ``py_openvino``) and four native-backend configs for NVIDIA's container
  (``native_libtorch``, ``native_onnxruntime``, ``native_openvino``, ``native_tensorrt``);
* the lab's model (``build_cnn`` / ``make_cnn``) and its artefacts: TorchScript ``model.pt``, ONNX
  ``model.onnx`` (checked with ``onnx.checker``) and the OpenVINO IR ``model.xml`` + ``model.bin``
  (``export_artifacts``);
* the same runtimes called directly in this process (``direct_runners``), the reference for outputs and
  for the Python backend's overhead;
* writers that copy the models into a run's repository with ``inference_course.triton.copy_model``,
  filling in per-run values (``write_python_models``, ``write_native_models``), and the check of a
  native config against its artefact (``native_problems``);
* small timers for the client side (``time_calls``).

The server itself comes from ``inference_course.triton`` (binary, ports, start/stop).
"""
from __future__ import annotations

import hashlib
import shutil
import time
import warnings
from pathlib import Path

from inference_course import triton

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
INPUT, OUTPUT = "INPUT__0", "OUTPUT__0"
RUNTIMES = ("torch_eager", "torchscript", "onnxruntime", "openvino")
PYTHON_MODELS = {runtime: f"py_{runtime}" for runtime in RUNTIMES}
# The native backend that would serve each artefact in NGC's container, and the file it loads from 1/.
NATIVE_MODELS = {
    "native_libtorch": ("pytorch_libtorch", "model.pt"),
    "native_onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "native_openvino": ("openvino", "model.xml"),
    "native_tensorrt": ("tensorrt_plan", "model.plan"),
}


def model_file(model: str, filename: str = "config.pbtxt", version: int | None = None) -> str:
    """The text of a file of the lab's model repository, e.g. ``model_file("py_onnxruntime", "model.py", 1)``."""
    folder = MODEL_REPOSITORY / model
    return ((folder / str(version)) if version is not None else folder).joinpath(filename).read_text()


def tree(root) -> str:
    """The files under ``root`` as an indented listing (what ``tree`` would print)."""
    root = Path(root)
    lines = [root.name + "/"]
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        depth = len(path.relative_to(root).parts)
        lines.append("    " * depth + path.name + ("/" if path.is_dir() else ""))
    return "\n".join(lines)


# -- the lab's model ----------------------------------------------------------------------------------


def build_cnn(channels: int, num_classes: int = 10):
    """A small CNN for 1x28x28 images (logits out); model_repository/py_torch_eager/1/model.py holds the same function."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(channels, 2 * channels, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(2 * channels * 7 * 7, num_classes),
    )


def make_cnn(channels: int, seed: int = 0, num_classes: int = NUM_CLASSES):
    """The lab's model with weights fixed by ``seed``, in eval mode (what py_torch_eager builds from its seed)."""
    import torch

    torch.manual_seed(seed)
    return build_cnn(channels, num_classes).eval()


def images(n: int, seed: int = 0):
    """``n`` random "images" [n, 1, 28, 28] (float32): the inputs every runtime is compared on."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, *IMAGE_SHAPE)).astype(np.float32)


# -- artefacts ----------------------------------------------------------------------------------------


def export_torchscript(model, example, path) -> Path:
    """``torch.jit.trace`` the model on ``example`` (a tensor) and save it: the libtorch backend's file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.jit.trace(model.eval(), example).save(str(path))
    return path


def export_onnx(model, example, path, opset: int = 17) -> Path:
    """Export to ONNX with a dynamic batch axis and Triton's tensor names, then ``onnx.checker`` it.

    The TorchScript-based exporter (``dynamo=False``) needs no extra package; torch warns that it is the
    legacy path, which the course silences here (the file it writes is checked below)."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_openvino_ir(onnx_path, xml_path) -> Path:
    """The OpenVINO IR (``model.xml`` + ``model.bin``) of an ONNX file, weights kept in FP32
    (``ov.save_model`` compresses them to FP16 unless told not to)."""
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


def export_artifacts(model, folder, example_rows: int = 2) -> dict[str, Path]:
    """model.pt, model.onnx and model.xml/.bin of ``model`` in ``folder``; the name of each -> its path."""
    import torch

    folder = Path(folder)
    example = torch.from_numpy(images(example_rows, seed=123))
    onnx_path = export_onnx(model, example, folder / "model.onnx")
    return {"model.pt": export_torchscript(model, example, folder / "model.pt"),
            "model.onnx": onnx_path,
            "model.xml": export_openvino_ir(onnx_path, folder / "model.xml")}


# -- the runtimes, called directly in this process ----------------------------------------------------


def direct_runners(model, artifacts: dict, *, device: str = "cpu", threads: int = 1,
                   providers=("CPUExecutionProvider",), precision_hint: str = "f32") -> dict:
    """One function per runtime, numpy batch in, numpy logits out, with the same settings the served
    models get from their config (threads, providers, precision). Torch runs on ``device``; OpenVINO on
    the CPU. Note: ``torch.set_num_threads`` applies to this whole process."""
    import numpy as np
    import onnxruntime as ort
    import openvino as ov
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    eager = model.eval().to(device)
    scripted = torch.jit.load(str(artifacts["model.pt"]), map_location=device).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(artifacts["model.onnx"]), options, providers=list(providers))
    compiled = ov.Core().compile_model(str(artifacts["model.onnx"]), "CPU", {
        "INFERENCE_PRECISION_HINT": precision_hint, "INFERENCE_NUM_THREADS": threads})

    def torch_runner(module):
        def run(batch):
            with torch.inference_mode():
                return module(torch.from_numpy(batch).to(device)).cpu().numpy()
        return run

    return {
        "torch_eager": torch_runner(eager),
        "torchscript": torch_runner(scripted),
        "onnxruntime": lambda batch: session.run([OUTPUT], {INPUT: batch})[0],
        "openvino": lambda batch: np.array(compiled(batch)[0], dtype=np.float32, copy=True),
    }


def time_calls(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# -- the run's repository ------------------------------------------------------------------------------


def _group(kind: str) -> str:
    body = "kind: KIND_GPU count: 1 gpus: [ 0 ]" if kind == "KIND_GPU" else "kind: KIND_CPU count: 1"
    return f"instance_group [ {{ {body} }} ]"


def python_model_changes(runtime: str, *, channels: int, max_batch_size: int = 32, kind: str = "KIND_CPU",
                         threads: int = 1, providers=("CPUExecutionProvider",), precision_hint: str = "f32",
                         seed: int = 0, sha256: str = "none") -> dict:
    """What differs from ``model_repository/py_<runtime>/config.pbtxt`` in this run: ``parameters`` and
    ``replace`` for ``triton.copy_model``. ``sha256``: the digest of the artefact the copy gets, which its
    model.py checks at load. OpenVINO runs on the CPU whatever ``kind`` says; ONNX Runtime stays on the CPU
    unless CUDA is its first provider."""
    replace = {"max_batch_size: 32\n": f"max_batch_size: {max_batch_size}\n"}
    if runtime == "onnxruntime" and providers[0] != "CUDAExecutionProvider":
        kind = "KIND_CPU"
    if runtime != "openvino" and kind != "KIND_CPU":
        replace["instance_group [ { kind: KIND_CPU count: 1 } ]"] = _group(kind)
    parameters = {"cpu_threads": threads, "sha256": sha256}
    if runtime == "torch_eager":
        parameters.update(channels=channels, seed=seed)
    elif runtime == "onnxruntime":
        parameters["providers"] = ",".join(providers)
    elif runtime == "openvino":
        parameters["precision_hint"] = precision_hint
    return {"parameters": parameters, "replace": replace}


def sha256_of(data) -> str:
    """The hex SHA-256 of ``data`` (bytes) or of a file's content (a path)."""
    return hashlib.sha256(data if isinstance(data, bytes) else Path(data).read_bytes()).hexdigest()


def write_python_models(repository, model, artifacts: dict, **kw) -> dict[str, Path]:
    """Copy the four ``py_*`` models into ``repository`` with this run's values (``python_model_changes``)
    and put each one's artefact beside its ``model.py`` (weights.pt, model.pt, model.onnx), its digest in
    the config's ``sha256``. The runtime name -> the copy's folder."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    files = {"torch_eager": ("weights.pt", buffer.getvalue()), "torchscript": ("model.pt", artifacts["model.pt"]),
             "onnxruntime": ("model.onnx", artifacts["model.onnx"]), "openvino": ("model.onnx", artifacts["model.onnx"])}
    channels = model[0].out_channels
    made = {}
    for runtime, name in PYTHON_MODELS.items():
        filename, content = files[runtime]
        target = triton.copy_model(MODEL_REPOSITORY, name, repository, **python_model_changes(
            runtime, channels=channels, sha256=sha256_of(content), **kw))
        if isinstance(content, bytes):
            (target / "1" / filename).write_bytes(content)
        else:
            shutil.copy2(content, target / "1" / filename)
        made[runtime] = target
    return made


def write_native_models(repository, artifacts: dict, *, max_batch_size: int = 32, kind: str = "KIND_CPU") -> dict[str, Path]:
    """Copy the four ``native_*`` configs into ``repository`` with the artefacts their backends load
    (``model.plan`` is never made: TensorRT is not installable here). The model name -> its folder."""
    made = {}
    for name, (_platform, filename) in NATIVE_MODELS.items():
        replace = {"max_batch_size: 32\n": f"max_batch_size: {max_batch_size}\n"}
        if name in ("native_libtorch", "native_onnxruntime") and kind != "KIND_CPU":
            replace["instance_group [ { kind: KIND_CPU count: 1 } ]"] = _group(kind)
        target = triton.copy_model(MODEL_REPOSITORY, name, repository, replace=replace)
        (target / "1").mkdir(exist_ok=True)
        sources = [artifacts[filename]] if filename in artifacts else []
        if filename == "model.xml" and sources:
            sources.append(Path(artifacts[filename]).with_suffix(".bin"))
        for source in sources:
            shutil.copy2(source, target / "1" / Path(source).name)
        made[name] = target
    return made


def native_problems(model_dir, io: dict | None = None) -> list[str]:
    """What stops NGC's Triton from serving ``model_dir`` as it is: the config parsed with Triton's
    protobuf, the platform or backend expected for its name, the artefact file in ``1/``, and (``io``: the
    ONNX graph's ``{"inputs": {name: dims}, "outputs": {...}}`` without the batch axis) tensor names and
    dims. An empty list means none was found."""
    model_dir = Path(model_dir)
    config = triton.parse_config(model_dir)
    problems = []
    expected, filename = NATIVE_MODELS.get(model_dir.name, (None, None))
    got = config.platform or config.backend
    if expected and got != expected:
        problems.append(f"platform/backend is {got!r}, expected {expected!r}")
    artefact = model_dir / "1" / (config.default_model_filename or filename or "")
    if filename and not artefact.is_file():
        problems.append(f"no {artefact.relative_to(model_dir)}")
    if io:
        for kind, tensors in (("input", config.input), ("output", config.output)):
            graph = io[f"{kind}s"]
            names = [t.name for t in tensors]
            if sorted(names) != sorted(graph):
                problems.append(f"{kind} names {names} differ from the graph's {sorted(graph)}")
                continue
            for t in tensors:
                if list(t.dims) != list(graph[t.name]):
                    problems.append(f"{kind} {t.name}: config dims {list(t.dims)}, graph {list(graph[t.name])}")
    return problems
