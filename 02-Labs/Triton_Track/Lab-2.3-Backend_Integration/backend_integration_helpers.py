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
* small timers for the client side (``time_calls``);
* notebook 03 (LLM backends): the course's Python-based vLLM backend beside this module
  (``backends/vllm_course/model.py``, ``VLLM_BACKEND``) and its model (``write_vllm_model``), the
  streaming client that drives a token-streaming Triton model at a fixed concurrency
  (``triton_stream_requests``, whose results ``inference_course.bench.summarize`` reads like those of
  ``vllm serve``), and Triton's own metrics read with the Prometheus client's parser (``triton_metrics``).

The server itself comes from ``inference_course.triton`` (binary, ports, start/stop).
"""
from __future__ import annotations

import hashlib
import json
import queue
import shutil
import threading
import time
import warnings
from pathlib import Path

from inference_course import triton

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
# Python-based backends written by the course: backend "vllm_course" is backends/vllm_course/model.py.
VLLM_BACKEND = Path(__file__).resolve().parent / "backends" / "vllm_course"
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


tree = triton.tree  # the package's listing of a model repository (shared by the Triton labs)


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


# -- notebook 02: accelerated runtimes ------------------------------------------------------------------

# ONNX Runtime's graph optimization levels, by the names the py_onnxruntime config takes.
ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
# Copies of the Python-backend models that notebook 02 serves: name -> (model copied, its parameters, artefact).
ACCELERATED_MODELS = {
    "py_ort_disabled": ("py_onnxruntime", {"graph_optimization_level": "disabled"}, "model.onnx"),
    "py_ort_all": ("py_onnxruntime", {"graph_optimization_level": "all"}, "model.onnx"),
    "py_ort_int8": ("py_onnxruntime", {"graph_optimization_level": "all", "model_file": "model_int8.onnx"},
                    "model_int8.onnx"),
    "py_openvino_default": ("py_openvino", {"precision_hint": "default"}, "model.onnx"),
}
# The ONNX Runtime model with TensorRT as its GPU execution accelerator (NGC's container, GPU): parsed, not served.
TRT_ACCELERATED = "native_onnxruntime_trt"


def ort_session(path, *, level: str = "all", threads: int = 1, providers=("CPUExecutionProvider",),
                optimized_path=None):
    """An ONNX Runtime session at graph optimization ``level`` (a key of ``ORT_LEVELS``); with
    ``optimized_path`` ONNX Runtime also writes the graph it optimized there (``optimized_model_filepath``).
    Warnings are not logged (at level "all" ORT warns that the saved graph may hold CPU-specific nodes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=list(providers))


def op_counts(path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph at ``path`` has (sum the values for the node count)."""
    import collections

    import onnx

    return dict(collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node))


INT8_DOT_INSTRUCTIONS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_instructions(cpuinfo: str | None = None) -> list[str]:
    """The int8 dot-product instructions (VNNI, AMX) this x86 CPU has, from /proc/cpuinfo's flags ([] when
    it has none, or where /proc/cpuinfo does not exist)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = set(cpuinfo.split())
    return [name for name in INT8_DOT_INSTRUCTIONS if name in flags]


def quantize_int8(onnx_path, out_path, calibration_reader=None, max_feeds: int = 64,
                  reduce_range: bool | None = None) -> Path:
    """An int8 copy of the ONNX graph: static QDQ quantization (per-channel weights, activations calibrated
    on ``calibration_reader``'s batches, an ``onnxruntime.quantization.CalibrationDataReader``) or, with no
    reader, dynamic quantization (weights only; activations quantized per batch at run time). At most
    ``max_feeds`` batches are read, so that a reader which never returns None cannot calibrate forever.

    ``reduce_range`` (None: decided by this CPU) quantizes weights to 7 bits. x86 CPUs without VNNI (AVX2,
    AVX-512 before VNNI) multiply int8 with an instruction whose 16-bit intermediate sums can saturate,
    the most likely cause of one CI run's top-1 agreement below 0.9 for the lab's CNN (that machine's CPU
    flags were not recorded; 1.000 on VNNI machines); 7-bit weights cannot saturate it, at the cost of half
    the weights' resolution (on a VNNI machine, 2026-12-02: static top-1 agreement 0.953 with 7 bits, 1.000
    with 8). ONNX Runtime's ``reduce_range``: "7-bit quantization for better accuracy on non-VNNI CPUs";
    OpenVINO documents the same saturation issue and workaround."""
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if calibration_reader is not None:
        class Bounded(CalibrationDataReader):
            def __init__(self, reader):
                self.reader, self.left = reader, max_feeds

            def get_next(self):
                self.left -= 1
                return self.reader.get_next() if self.left >= 0 else None

        calibration_reader = Bounded(calibration_reader)

    if reduce_range is None:
        reduce_range = not cpu_int8_instructions()
    out_path = Path(out_path)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # quiet the "consider pre-processing" advice
    try:
        if calibration_reader is None:
            quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8,
                             reduce_range=reduce_range)
        else:
            quantize_static(str(onnx_path), str(out_path), calibration_reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            reduce_range=reduce_range)
    finally:
        root.level = level
    return out_path


def accuracy(out, reference) -> tuple[float, float]:
    """(max |out - reference|, share of rows whose top-1 class agrees) of two [n, classes] logit arrays."""
    import numpy as np

    out, reference = np.asarray(out), np.asarray(reference)
    return float(np.abs(out - reference).max()), float((out.argmax(1) == reference.argmax(1)).mean())


def write_accelerated_models(repository, artifacts: dict, int8_path, *, max_batch_size: int = 32,
                             threads: int = 1) -> dict[str, Path]:
    """Copy ``ACCELERATED_MODELS`` into ``repository``: each a copy of py_onnxruntime or py_openvino under
    its own name, with its parameters, this run's ``max_batch_size``/``cpu_threads`` and its artefact (and
    digest) in ``1/``. All run on the CPU. The model name -> its folder."""
    files = {"model.onnx": Path(artifacts["model.onnx"]), "model_int8.onnx": Path(int8_path)}
    made = {}
    for name, (source, parameters, filename) in ACCELERATED_MODELS.items():
        target = triton.copy_model(MODEL_REPOSITORY, source, repository, name=name, parameters={
            **parameters, "cpu_threads": threads, "sha256": sha256_of(files[filename])},
            replace={"max_batch_size: 32\n": f"max_batch_size: {max_batch_size}\n"})
        shutil.copy2(files[filename], target / "1" / filename)
        made[name] = target
    return made


def trt_accelerator(config) -> dict | None:
    """The ``tensorrt`` GPU execution accelerator of a parsed config (``triton.parse_config``) as
    ``{"max_workspace_size_bytes": ..., "precision_mode": ...}`` (keys sorted), or None when it has none."""
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accelerator.name == "tensorrt":
            return dict(sorted(accelerator.parameters.items()))  # a protobuf map has no fixed order
    return None


# -- notebook 03: LLM backends ---------------------------------------------------------------------------

# Lab 2.2's hand-written generate model (transformers, one forward per token), reused as it is.
LAB22_REPOSITORY = Path(__file__).resolve().parents[1] / "Lab-2.2-Multi_Model_Management" / "model_repository"


def write_handwritten_model(repository, model_dir, *, kind: str = "KIND_CPU", max_tokens: int = 32,
                            dtype: str = "float32", name: str = "llm") -> Path:
    """Copy Lab 2.2's ``model_repository/llm`` (the hand-written transformers model) into ``repository``."""
    replace = {} if kind == "KIND_CPU" else {"kind: KIND_CPU": f"kind: {kind}"}
    return triton.copy_model(LAB22_REPOSITORY, "llm", repository, name=name, replace=replace, parameters={
        "model_dir": str(model_dir), "max_tokens": max_tokens, "dtype": dtype, "temperature": 0.0, "seed": 0})


def write_vllm_model(repository, model_dir, engine_args: dict, *, name: str = "llm_vllm",
                     max_tokens: int = 32) -> Path:
    """Copy ``model_repository/llm_vllm`` into ``repository`` with the model folder and the engine's
    settings (JSON; keys of vLLM's ``AsyncEngineArgs``) filled in."""
    return triton.copy_model(MODEL_REPOSITORY, "llm_vllm", repository, name=name, parameters={
        "model_dir": str(model_dir), "engine_args": json.dumps(engine_args, sort_keys=True),
        "max_tokens": max_tokens})


def triton_stream_requests(grpc_url: str, model: str, prompts, *, concurrency: int, max_tokens: int,
                           ignore_eos: bool | None = None, timeout_s: float = 600.0):
    """Send every prompt (a list of token ids) once to a decoupled Triton model that streams TOKEN_ID responses
    (one token each, or several when the model sends what the engine made since its last response), at most
    ``concurrency`` in flight: ``concurrency`` workers, each with its own gRPC stream, take the next prompt as
    soon as their previous request ended (a closed loop, as ``bench.run`` keeps ``concurrency`` requests in
    flight). Returns ``(results, duration_s)``: one ``bench.RequestResult`` per prompt (TTFT = the first
    response with tokens, ITL = the gaps between responses with tokens, as ``vllm bench serve`` counts the
    gaps between stream chunks; output tokens = the tokens in them; latency = the final response) and the
    wall time of the whole run."""
    import tritonclient.grpc as grpcclient

    from inference_course.bench import RequestResult

    prompts = [list(p) for p in prompts]
    results: list = [None] * len(prompts)
    todo: queue.Queue = queue.Queue()
    for index in range(len(prompts)):
        todo.put(index)
    clients = []
    for _ in range(min(concurrency, len(prompts))):
        arrivals: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(grpc_url)
        client.start_stream(callback=lambda result, error, q=arrivals: q.put((time.perf_counter(), result, error)))
        clients.append((client, arrivals))
    start_gate = threading.Barrier(len(clients) + 1)

    def worker(client, arrivals):
        start_gate.wait()
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            sent = time.perf_counter()
            times, n_tokens, error = [], 0, None
            try:
                client.async_stream_infer(model, triton.stream_inputs(prompts[index], max_tokens, ignore_eos),
                                          request_id=str(index), enable_empty_final_response=True)
                while True:
                    now, result, failure = arrivals.get(timeout=timeout_s)
                    if failure is not None:
                        error = str(failure)
                        break
                    response = result.get_response()
                    if response.outputs:
                        times.append(now)
                        n_tokens += result.as_numpy("TOKEN_ID").size
                    if response.parameters["triton_final_response"].bool_param:
                        break
            except queue.Empty:
                error = f"no response for {timeout_s:g} s"
            end = time.perf_counter()
            ok = error is None and bool(times)
            results[index] = RequestResult(
                ok=ok, prompt_tokens=len(prompts[index]), output_tokens=n_tokens, start=sent - t0,
                ttft=(times[0] - sent) if times else None, latency=end - sent,
                itl=[b - a for a, b in zip(times, times[1:])], error=error if not ok else None)

    threads = [threading.Thread(target=worker, args=pair, daemon=True) for pair in clients]
    try:
        for thread in threads:
            thread.start()
        t0 = time.perf_counter()
        start_gate.wait()
        for thread in threads:
            thread.join()
        duration = time.perf_counter() - t0
    finally:
        for client, _ in clients:
            client.stop_stream()
            client.close()
    return results, duration


def triton_metrics(metrics_text: str, model: str) -> dict[str, float]:
    """Triton's per-model metrics from its /metrics text (parsed with prometheus_client's parser): every
    ``nv_inference_*`` sample whose ``model`` label is ``model``, versions summed. A counter is keyed by the
    name Triton gives it (the parser calls its sample ``<name>_total``), other samples by their own name."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name.startswith("nv_inference_") and sample.labels.get("model") == model:
                key = family.name if family.type == "counter" else sample.name
                values[key] = values.get(key, 0.0) + sample.value
    return values


# -- notebook 04: choosing a backend from what notebooks 01-03 measured ---------------------------------

def cnn_options(m01: dict, m02: dict):
    """One row per way notebook 02 served the CNN through Triton's Python backend (same server, same client):
    batch-1 p50, rows/s at every batch and at the best one, accuracy against PyTorch eager f32 on the CPU
    (measured in the process, whose outputs 02 checks the served ones against; on the gpu profile the
    in-process ``torch_eager_f32`` ran on the GPU), the speed-up against ``torch_eager_f32`` through Triton and
    in the process, and the load time notebook 01 measured for the runtime (NaN where 01 has none).

    ``m01`` and ``m02`` are the ``data`` of notebooks 01 and 02's saved measurements."""
    import pandas as pd

    served = pd.DataFrame.from_dict(m02["served"], orient="index")
    direct = pd.DataFrame.from_dict(m02["direct"], orient="index")
    batches = [int(b) for b in m02["batches"]]
    frame = served[["p50_ms_b1", *[f"rows/s b={b}" for b in batches], "best_batch", "rows/s best"]].copy()
    frame["best_batch"] = frame["best_batch"].astype(int)
    frame["max_abs_diff"] = direct.loc[frame.index, "max_abs_diff"]
    frame["top1_agree"] = direct.loc[frame.index, "top1_agree"]
    base = "torch_eager_f32"
    for b in batches:
        frame[f"x b={b}"] = frame[f"rows/s b={b}"] / frame.loc[base, f"rows/s b={b}"]
    frame["speedup_b1"] = frame.loc[base, "p50_ms_b1"] / frame["p50_ms_b1"]
    frame["speedup_best"] = frame["rows/s best"] / frame.loc[base, "rows/s best"]
    frame["direct_speedup_best"] = direct.loc[frame.index, "rows/s best"] / direct.loc[base, "rows/s best"]
    runtime_of = {"torch_eager_f32": "torch_eager", "openvino_f32": "openvino", "ort_all": "onnxruntime"}
    frame["load_s"] = [m01["table"].get(runtime_of.get(v, ""), {}).get("load_s", float("nan")) for v in frame.index]
    return frame


def noise_floor(m01: dict, m02: dict) -> float:
    """The largest relative difference between two measurements of the same served model at batch 1: notebook
    01's py_torch_eager / py_openvino against notebook 02's (same model, same settings, another server and
    time). A speed-up smaller than this is not evidence. Notebook 02 serves every model on the CPU; 01 serves
    PyTorch eager on the profile's device (``m01["kind"]``), so that pair counts only when 01 used the CPU too.
    OpenVINO runs on the CPU in both."""
    pairs = [("openvino", "openvino_f32")]
    if m01.get("kind", "KIND_CPU") == "KIND_CPU":
        pairs.insert(0, ("torch_eager", "torch_eager_f32"))
    gaps = []
    for runtime, variant in pairs:
        a, b = m01["table"][runtime]["p50_ms_triton"], m02["served"][variant]["p50_ms_b1"]
        gaps.append(abs(a - b) / min(a, b))
    return max(gaps)


def llm_paths(m03: dict):
    """Notebook 03's rows as a frame indexed by (path, concurrency)."""
    import pandas as pd

    columns = ["path", "concurrency", "in_flight", "completed", "output_throughput", "median_ttft_ms",
               "p95_ttft_ms", "median_itl_ms", "median_tpot_ms", "median_e2e_ms"]
    return pd.DataFrame(m03["rows"])[columns].set_index(["path", "concurrency"])


def cnn_stops_paying(ratios: dict, paying: list, top1_agree: float) -> str:
    """Where one way of serving the CNN stops paying, in words (the end of "it stops paying ..."): ``ratios`` is its rows/s over PyTorch eager's
    through Triton at each batch, ``paying`` the batches where that counts as a speed-up, ``top1_agree`` the
    share of test rows whose class it keeps."""
    batches = sorted(ratios)
    shown = ", ".join(f"b={b}: x{ratios[b]:.2f}" for b in batches)
    accuracy = f"; it changes the class of {1 - top1_agree:.1%} of the test rows" if top1_agree < 1.0 else ""
    if not paying:
        return f"at every batch measured: it never beat the threshold ({shown}){accuracy}"
    if list(paying) == batches:
        return f"not within the batches measured: it paid at each ({shown}){accuracy}"
    if list(paying) == [b for b in batches if b >= paying[0]]:
        return f"below batch {paying[0]} ({shown}){accuracy}"
    if list(paying) == [b for b in batches if b <= paying[-1]]:
        return f"above batch {paying[-1]} ({shown}){accuracy}"
    return f"outside batch {', '.join(map(str, paying))} ({shown}){accuracy}"
