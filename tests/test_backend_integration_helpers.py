"""Tests of Triton Lab 2.3's helpers: the CNN and its artefacts (TorchScript, ONNX, OpenVINO IR), the
runtimes called directly, the per-run copies of the lab's model repository, the native-backend checks,
and the four Python-backend models served by the real tritonserver (bundled in nvidia-pytriton).

One server serves the module's live tests; each Python-backend model starts a stub process that imports
torch and its runtime (about a second each on 2 cores), so the file takes ~10 s.
"""
import ast
import inspect
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


# -- the real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model, artifacts, tmp_path_factory):
    if triton.pytriton_root() is None:
        pytest.skip("nvidia-pytriton is not installed (make env installs it)")
    import tritonclient.http as httpclient

    repo = tmp_path_factory.mktemp("repo")
    H.write_python_models(repo, model, artifacts, max_batch_size=8)
    H.write_native_models(repo, artifacts)
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
