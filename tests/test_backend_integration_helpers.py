"""Tests of Triton Lab 2.3's helpers: the CNN and its artefacts (TorchScript, ONNX, OpenVINO IR), the
runtimes called directly, the per-run copies of the lab's model repository, the native-backend checks,
the four Python-backend models served by the real tritonserver (bundled in nvidia-pytriton), and notebook
02's accelerated variants (ONNX Runtime optimization levels, int8, OpenVINO's default precision, the
TensorRT accelerator config).

One server serves the module's live tests; each Python-backend model starts a stub process that imports
torch and its runtime (about a second each on 2 cores); the file took 35 s while a CI run shared the 2 cores.
"""
import ast
import inspect
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from inference_course import triton

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "02-Labs/Triton_Track/Lab-2.3-Backend_Integration"
sys.path.insert(0, str(LAB))

import backend_integration_helpers as H  # noqa: E402

needs_triton = pytest.mark.skipif(triton.pytriton_root() is None,
                                  reason="nvidia-pytriton is not installed (make env installs it)")
CHANNELS = 4  # small: the tests check wiring, not speed


@pytest.fixture(scope="module")
def model():
    return H.make_cnn(CHANNELS, seed=1)


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    return H.export_artifacts(model, tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def int8(artifacts):
    """The static int8 graph of the test model, calibrated on two seeded batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{H.INPUT: H.images(8, seed=100 + i)} for i in range(2)])

        def get_next(self):
            return next(self.feeds, None)

    return H.quantize_int8(artifacts["model.onnx"], Path(artifacts["model.onnx"]).with_name("model_int8.onnx"), Reader())


@pytest.fixture(scope="module")
def reference(model):
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(H.images(5, seed=7))).numpy()


# -- offline -------------------------------------------------------------------------------------------


def test_model_py_keeps_the_helpers_build_cnn():
    def function_source(text):
        node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "build_cnn")
        return ast.dump(node)

    assert function_source(H.model_file("py_torch_eager", "model.py", 1)) == function_source(
        textwrap.dedent(inspect.getsource(H.build_cnn)))


def test_make_cnn_is_deterministic():
    import torch

    x = torch.from_numpy(H.images(2))
    assert torch.equal(H.make_cnn(4, seed=3)(x), H.make_cnn(4, seed=3)(x))
    assert not torch.equal(H.make_cnn(4, seed=3)(x), H.make_cnn(4, seed=4)(x))
    assert tuple(H.make_cnn(4)(x).shape) == (2, H.NUM_CLASSES)


def test_artifacts_are_checked_and_named_for_triton(artifacts):
    import onnx

    assert sorted(artifacts) == ["model.onnx", "model.pt", "model.xml"]
    assert artifacts["model.xml"].with_suffix(".bin").is_file()
    graph = onnx.load(str(artifacts["model.onnx"])).graph
    assert [i.name for i in graph.input] == [H.INPUT] and [o.name for o in graph.output] == [H.OUTPUT]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is dynamic
    onnx.checker.check_model(onnx.load(str(artifacts["model.onnx"])), full_check=True)


def test_every_runtime_agrees_with_eager_in_process(model, artifacts, reference):
    runners = H.direct_runners(model, artifacts, threads=1)
    x = H.images(5, seed=7)
    for runtime in H.RUNTIMES:
        assert np.allclose(runners[runtime](x), reference, atol=1e-4, rtol=1e-4), runtime
    assert runners["openvino"](x[:3]).shape == (3, H.NUM_CLASSES)  # the batch axis stayed dynamic


def test_per_run_copies_fill_in_parameters_and_artefacts(model, artifacts, tmp_path):
    made = H.write_python_models(tmp_path, model, artifacts, max_batch_size=8, kind="KIND_GPU",
                                 providers=["CPUExecutionProvider"], precision_hint="f32")
    assert sorted(made) == sorted(H.RUNTIMES)
    eager = triton.parse_config(made["torch_eager"])
    assert eager.parameters["channels"].string_value == str(CHANNELS) and eager.max_batch_size == 8
    assert eager.instance_group[0].kind == eager.instance_group[0].KIND_GPU
    # ONNX Runtime without CUDA first, and OpenVINO, stay on the CPU whatever the profile asks for
    for runtime in ("onnxruntime", "openvino"):
        config = triton.parse_config(made[runtime])
        assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU, runtime
    for runtime, filename in (("torch_eager", "weights.pt"), ("torchscript", "model.pt"),
                              ("onnxruntime", "model.onnx"), ("openvino", "model.onnx")):
        digest = triton.parse_config(made[runtime]).parameters["sha256"].string_value
        assert digest == H.sha256_of(made[runtime] / "1" / filename), runtime
    onnx_gpu = H.python_model_changes("onnxruntime", channels=4, kind="KIND_GPU",
                                      providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_gpu["parameters"]["providers"] == "CUDAExecutionProvider,CPUExecutionProvider"
    assert "KIND_GPU" in next(iter(v for k, v in onnx_gpu["replace"].items() if "instance_group" in k))


def test_native_repositories_parse_and_report_what_is_missing(artifacts, tmp_path):
    made = H.write_native_models(tmp_path, artifacts, kind="KIND_GPU")
    io = {"inputs": {H.INPUT: list(H.IMAGE_SHAPE)}, "outputs": {H.OUTPUT: [H.NUM_CLASSES]}}
    for name, (platform, _file) in H.NATIVE_MODELS.items():
        config = triton.parse_config(made[name])
        assert (config.platform or config.backend) == platform
    assert {name: H.native_problems(folder, io) for name, folder in made.items()} == {
        "native_libtorch": [], "native_onnxruntime": [], "native_openvino": [],
        "native_tensorrt": ["no 1/model.plan"]}
    wrong = {"inputs": {"images": list(H.IMAGE_SHAPE)}, "outputs": {H.OUTPUT: [H.NUM_CLASSES + 1]}}
    problems = H.native_problems(made["native_onnxruntime"], wrong)
    assert any("input names" in p for p in problems) and any("config dims [10], graph [11]" in p for p in problems)


def test_ort_levels_keep_outputs_and_never_add_nodes(artifacts, tmp_path):
    x = H.images(5, seed=7)
    exported = sum(H.op_counts(artifacts["model.onnx"]).values())
    outputs = {}
    for level in H.ORT_LEVELS:
        saved = tmp_path / f"{level}.onnx"
        outputs[level] = H.ort_session(artifacts["model.onnx"], level=level, optimized_path=saved).run(None, {H.INPUT: x})[0]
        assert saved.is_file() and sum(H.op_counts(saved).values()) <= exported, level
    assert "FusedConv" in H.op_counts(tmp_path / "extended.onnx")
    assert all(np.allclose(out, outputs["disabled"], atol=1e-5, rtol=1e-5) for out in outputs.values())


def test_int8_stays_within_its_tolerance_of_f32(artifacts, int8, reference, tmp_path):
    x = H.images(5, seed=7)
    dynamic = H.quantize_int8(artifacts["model.onnx"], tmp_path / "dynamic.onnx")
    for path in (int8, dynamic):
        ops = H.op_counts(path)
        assert "QuantizeLinear" in ops or "DynamicQuantizeLinear" in ops, ops
        max_diff, top1 = H.accuracy(H.ort_session(path).run(None, {H.INPUT: x})[0], reference)
        assert 0 < max_diff < 0.5 and top1 >= 0.8, (path.name, max_diff, top1)


def test_accuracy_and_the_tensorrt_accelerator_config():
    a = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert H.accuracy(a, a) == (0.0, 1.0)
    assert H.accuracy(a, a[::-1]) == (1.0, 0.0)
    config = triton.parse_config(H.MODEL_REPOSITORY / H.TRT_ACCELERATED)
    assert config.platform == "onnxruntime_onnx"
    assert H.trt_accelerator(config) == {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}
    assert H.trt_accelerator(triton.parse_config(H.MODEL_REPOSITORY / "native_onnxruntime")) is None


def test_accelerated_copies_differ_only_in_their_parameters(artifacts, int8, tmp_path):
    made = H.write_accelerated_models(tmp_path, artifacts, int8, max_batch_size=8, threads=2)
    assert set(made) == set(H.ACCELERATED_MODELS)
    for name, (source, parameters, filename) in H.ACCELERATED_MODELS.items():
        config = triton.parse_config(made[name])
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert config.max_batch_size == 8 and params["cpu_threads"] == "2", name
        assert all(params[k] == v for k, v in parameters.items()), name
        assert params["sha256"] == H.sha256_of(made[name] / "1" / filename), name
        assert (made[name] / "1" / "model.py").read_text() == H.model_file(source, "model.py", 1), name


# -- the real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model, artifacts, int8, tmp_path_factory):
    if triton.pytriton_root() is None:
        pytest.skip("nvidia-pytriton is not installed (make env installs it)")
    import tritonclient.http as httpclient

    repo = tmp_path_factory.mktemp("repo")
    H.write_python_models(repo, model, artifacts, max_batch_size=8)
    H.write_native_models(repo, artifacts)
    H.write_accelerated_models(repo, artifacts, int8, max_batch_size=8)
    # a copy whose sha256 names another file: model.py must refuse to load it
    triton.copy_model(repo, "py_onnxruntime", repo, name="py_onnxruntime_tampered",
                      parameters={"sha256": "0" * 64})
    with triton.triton_server(repo, model_control_mode="explicit", load_models=list(H.PYTHON_MODELS.values()),
                              exit_timeout_s=2) as server:
        client = httpclient.InferenceServerClient(triton.http_url(server), network_timeout=300)
        try:
            yield client
        finally:
            client.close()


def _infer(client, name, x):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput(H.INPUT, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(name, [inp]).as_numpy(H.OUTPUT)


@needs_triton
@pytest.mark.engine
def test_each_python_backend_model_matches_direct_execution(served, model, artifacts, reference):
    runners = H.direct_runners(model, artifacts, threads=1)
    x = H.images(5, seed=7)
    for runtime, name in H.PYTHON_MODELS.items():
        got = _infer(served, name, x)
        assert got.shape == (5, H.NUM_CLASSES), name
        assert np.allclose(got, runners[runtime](x), atol=1e-5, rtol=1e-5), name
        assert np.allclose(got, reference, atol=1e-4, rtol=1e-4), name


@needs_triton
@pytest.mark.engine
def test_native_models_and_a_tampered_artefact_are_refused(served):
    from tritonclient.utils import InferenceServerException

    for name in H.NATIVE_MODELS:
        with pytest.raises(InferenceServerException, match="unable to find backend library"):
            served.load_model(name)
    with pytest.raises(InferenceServerException, match="config.pbtxt expects 000000000000"):
        served.load_model("py_onnxruntime_tampered")
    assert all(served.is_model_ready(name) for name in H.PYTHON_MODELS.values())


@needs_triton
@pytest.mark.engine
def test_accelerated_models_match_direct_execution(served, artifacts, int8):
    import openvino as ov

    x = H.images(5, seed=7)  # py_ort_all differs from py_ort_disabled only in a parameter value: not loaded here
    default_ov = ov.Core().compile_model(str(artifacts["model.onnx"]), "CPU", {"INFERENCE_NUM_THREADS": 1})
    direct = {"py_ort_disabled": H.ort_session(artifacts["model.onnx"], level="disabled").run(None, {H.INPUT: x})[0],
              "py_ort_int8": H.ort_session(int8, level="all").run(None, {H.INPUT: x})[0],
              "py_openvino_default": np.array(default_ov(x)[0])}
    for name, expected in direct.items():
        served.load_model(name)
        assert np.allclose(_infer(served, name, x), expected, atol=1e-5, rtol=1e-5), name


# -- notebook 03 (LLM backends): the parts that need no engine; the notebook runs the rest under nbval ------

TRITON_METRICS = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="llm_vllm",version="1"} 21
nv_inference_request_success{model="llm_vllm",version="2"} 4
nv_inference_request_success{model="llm",version="1"} 9
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="llm_vllm",version="1"} 105000
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.5
"""


def test_triton_metrics_reads_counters_by_their_own_name_and_sums_versions():
    assert H.triton_metrics(TRITON_METRICS, "llm_vllm") == {
        "nv_inference_request_success": 25.0, "nv_inference_request_duration_us": 105000.0}
    assert H.triton_metrics(TRITON_METRICS, "llm") == {"nv_inference_request_success": 9.0}
    assert H.triton_metrics(TRITON_METRICS, "absent") == {}


def test_the_vllm_model_copy_carries_the_engine_settings(tmp_path):
    import json

    folder = H.write_vllm_model(tmp_path, "/models/x", {"dtype": "float32", "max_model_len": 512}, max_tokens=8)
    config = triton.parse_config(folder)
    assert config.backend == "vllm_course" and config.model_transaction_policy.decoupled
    assert config.parameters["model_dir"].string_value == "/models/x"
    assert json.loads(config.parameters["engine_args"].string_value) == {"dtype": "float32", "max_model_len": 512}
    assert config.parameters["max_tokens"].string_value == "8"
    assert (folder / "1").is_dir()  # Triton needs the version folder; the code is the backend's
    hand = H.write_handwritten_model(tmp_path, "/models/x", kind="KIND_GPU", max_tokens=8)
    config = triton.parse_config(hand)
    assert config.backend == "python" and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert (hand / "1" / "model.py").read_text() == (H.LAB22_REPOSITORY / "llm" / "1" / "model.py").read_text()


@needs_triton
def test_python_backends_are_installed_where_triton_looks_for_them(tmp_path):
    root = triton.install_python_backends({"vllm_course": H.VLLM_BACKEND})
    assert (root / "vllm_course" / "model.py").read_text() == (H.VLLM_BACKEND / "model.py").read_text()
    assert (root / "python" / "libtriton_python.so").is_file()  # Python-based backends run on it
    with pytest.raises(FileNotFoundError, match="model.py"):
        triton.install_python_backends({"empty": tmp_path})


# -- notebook 04: the decision table's pieces, on measurements written by hand -----------------------------

def _m02(served_b1=(1.0, 0.5), direct_rate=(100.0, 400.0), served_rate=((10.0, 40.0), (12.0, 70.0))):
    variants = ("torch_eager_f32", "ort_all")
    served = {v: {"p50_ms_b1": served_b1[i], "rows/s b=1": served_rate[i][0], "rows/s b=8": served_rate[i][1],
                  "best_batch": 8, "rows/s best": served_rate[i][1]} for i, v in enumerate(variants)}
    direct = {v: {"max_abs_diff": [1e-7, 2e-7][i], "top1_agree": 1.0, "p50_ms_b1": 0.1, "rows/s best": direct_rate[i]}
              for i, v in enumerate(variants)}
    return {"batches": [1, 8], "pays_off": 1.1, "served": served, "direct": direct}


def _m01(eager_b1=1.1, openvino_b1=0.8):
    return {"table": {"torch_eager": {"p50_ms_triton": eager_b1, "load_s": 2.0},
                      "openvino": {"p50_ms_triton": openvino_b1, "load_s": 3.0}}}


def test_cnn_options_compares_every_served_variant_with_eager():
    m02 = _m02()
    m02["served"]["openvino_f32"] = dict(m02["served"]["torch_eager_f32"], p50_ms_b1=0.9)
    m02["direct"]["openvino_f32"] = dict(m02["direct"]["torch_eager_f32"], top1_agree=0.75)
    frame = H.cnn_options(_m01(), m02)
    assert list(frame.index) == ["torch_eager_f32", "ort_all", "openvino_f32"]
    assert frame.loc["ort_all", "x b=1"] == pytest.approx(1.2) and frame.loc["ort_all", "x b=8"] == pytest.approx(1.75)
    assert frame.loc["ort_all", "speedup_b1"] == pytest.approx(2.0)
    assert frame.loc["ort_all", "direct_speedup_best"] == pytest.approx(4.0)
    assert frame.loc["openvino_f32", "top1_agree"] == 0.75 and frame.loc["openvino_f32", "load_s"] == 3.0
    assert math.isnan(frame.loc["ort_all", "load_s"])  # this m01 has no onnxruntime row
    assert frame.loc["torch_eager_f32", "load_s"] == 2.0


def test_noise_floor_is_the_largest_gap_between_the_two_notebooks():
    m02 = _m02()
    m02["served"]["openvino_f32"] = dict(m02["served"]["torch_eager_f32"], p50_ms_b1=1.0)
    assert H.noise_floor(_m01(eager_b1=1.1, openvino_b1=0.8), m02) == pytest.approx(0.25)  # 0.8 vs 1.0
    assert H.noise_floor(_m01(eager_b1=1.0, openvino_b1=1.0), m02) == pytest.approx(0.0)
    on_gpu = dict(_m01(eager_b1=3.0, openvino_b1=1.0), kind="KIND_GPU")  # 01 served eager on the GPU: not a pair
    assert H.noise_floor(on_gpu, m02) == pytest.approx(0.0)
    assert H.noise_floor(dict(on_gpu, kind="KIND_CPU"), m02) == pytest.approx(2.0)


@pytest.mark.parametrize("ratios, paying, top1, expected", [
    ({1: 0.9, 8: 1.4}, [], 1.0, "at every batch measured"),
    ({1: 1.3, 8: 1.4}, [1, 8], 1.0, "not within the batches measured"),
    ({1: 0.9, 8: 1.4, 32: 1.5}, [8, 32], 1.0, "below batch 8"),
    ({1: 1.5, 8: 1.2, 32: 0.9}, [1, 8], 1.0, "above batch 8"),
    ({1: 0.9, 8: 1.4, 32: 0.9}, [8], 1.0, "outside batch 8"),
    ({1: 1.3, 8: 1.4}, [1, 8], 0.875, "changes the class of 12.5% of the test rows"),
])
def test_cnn_stops_paying_names_each_shape(ratios, paying, top1, expected):
    text = H.cnn_stops_paying(ratios, paying, top1)
    assert expected in text
    assert ("changes the class" in text) == (top1 < 1.0)


# -- the stream clients on a model that sends several tokens per response (as vllm_course does when it lags) --

CHUNKS_CONFIG = """backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "IGNORE_EOS" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
]
output [ { name: "TOKEN_ID" data_type: TYPE_INT64 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
# Answers every request with the prompt's ids in chunks of 1, 2, 3, ... tokens (one response each), then FINAL.
CHUNKS_MODEL = """import time

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            ids = from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").to_dlpack()).reshape(-1).tolist()
            start, size = 0, 1
            while start < len(ids):
                time.sleep(0.02)
                chunk = torch.tensor(ids[start:start + size], dtype=torch.int64)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("TOKEN_ID", to_dlpack(chunk))]))
                start, size = start + size, size + 1
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


@needs_triton
def test_stream_clients_count_every_token_of_a_multi_token_response(tmp_path):
    (tmp_path / "chunks" / "1").mkdir(parents=True)
    (tmp_path / "chunks" / "config.pbtxt").write_text(CHUNKS_CONFIG)
    (tmp_path / "chunks" / "1" / "model.py").write_text(CHUNKS_MODEL)
    prompt = list(range(100, 110))  # 10 ids: responses of 1, 2, 3 and 4 tokens
    with triton.triton_server(tmp_path, exit_timeout_s=2) as server:
        result = triton.stream_generate(triton.grpc_url(server), "chunks", prompt)
        assert result.token_ids == prompt
        assert len(set(result.arrival_s)) == 4  # tokens of one response share its arrival time
        results, duration = H.triton_stream_requests(triton.grpc_url(server), "chunks", [prompt, prompt[:3]],
                                                     concurrency=2, max_tokens=10)
    first, second = results
    assert first.ok and first.output_tokens == 10 and len(first.itl) == 3  # 4 responses: 3 gaps
    assert second.ok and second.output_tokens == 3 and len(second.itl) == 1  # responses of 1 and 2 tokens
    assert 0 < first.ttft < first.latency <= duration
    assert all(gap > 0.01 for gap in first.itl)  # the model sleeps 20 ms before each response


def test_cpu_int8_instructions_reads_the_flags_and_quantize_int8_takes_7_bit_weights_without_them(artifacts, tmp_path):
    import onnx
    from onnx import numpy_helper

    assert H.cpu_int8_instructions("flags : fpu avx2 avx512f") == []
    assert H.cpu_int8_instructions("flags : avx2 avx_vnni amx_int8") == ["avx_vnni", "amx_int8"]

    def widest_weight(path):
        return max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
                   for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8)

    seven = H.quantize_int8(artifacts["model.onnx"], tmp_path / "seven.onnx", reduce_range=True)
    eight = H.quantize_int8(artifacts["model.onnx"], tmp_path / "eight.onnx", reduce_range=False)
    assert widest_weight(seven) <= 64 < widest_weight(eight) <= 127, (widest_weight(seven), widest_weight(eight))
