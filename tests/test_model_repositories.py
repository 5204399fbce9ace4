"""The Triton labs' model repositories are real files: every ``config.pbtxt`` under
``02-Labs/*/*/model_repository`` parses with Triton's own protobuf (``model_config_pb2``), every
Python-backend model has a numbered version folder with a ``model.py`` that compiles, and the
package's ``copy_model`` / ``substitute`` / ``diff_text`` / ``parse_config`` do what the notebooks rely on.
The last tests start the real server (bundled in nvidia-pytriton) on the lab folders' files as they are.
"""
import ast
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from inference_course import triton

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("02-Labs/*/*/model_repository/*/config.pbtxt"))
LAB21 = ROOT / "02-Labs/Triton_Track/Lab-2.1-Triton_Server_Basics"
LAB22 = ROOT / "02-Labs/Triton_Track/Lab-2.2-Multi_Model_Management"
LAB23 = ROOT / "02-Labs/Triton_Track/Lab-2.3-Backend_Integration"
for lab in (LAB21, LAB22, LAB23):
    sys.path.insert(0, str(lab))

import multi_model_helpers as mm  # noqa: E402
import triton_basics_helpers as H  # noqa: E402


def _id(path: Path) -> str:
    return f"{path.parents[2].name}/{path.parent.name}"


def test_every_triton_lab_has_a_model_repository():
    labs = {p.parents[2].name for p in CONFIGS}
    assert {LAB21.name, LAB22.name, LAB23.name} <= labs, labs


@pytest.mark.parametrize("config_path", CONFIGS, ids=_id)
def test_config_parses_with_tritons_protobuf(config_path):
    config = triton.parse_config(config_path)
    assert config.backend or config.platform, f"{config_path}: neither backend nor platform"
    if config.name:
        assert config.name == config_path.parent.name, "the name in config.pbtxt must match its folder"
    for key, value in config.parameters.items():
        assert value.string_value, f"{config_path}: parameter {key!r} has no string_value"


# Python-based backends written by the course: <lab>/backends/<name>/model.py serves `backend: "<name>"`.
COURSE_BACKENDS = {p.parent.name: p for p in ROOT.glob("02-Labs/*/*/backends/*/model.py")}


@pytest.mark.parametrize("config_path", CONFIGS, ids=_id)
def test_python_models_have_a_version_folder_with_model_py_that_compiles(config_path):
    config = triton.parse_config(config_path)
    model_dir = config_path.parent
    if config.platform == "ensemble":
        pytest.skip("ensemble: no model.py (Triton's ensemble scheduler runs it; the version folder holds only a .gitkeep, so that git keeps it)")
    if config.backend != "python" and config.backend not in COURSE_BACKENDS:
        pytest.skip(f"{config.platform or config.backend}: no model.py; the version folder holds an artefact "
                    "(a notebook exports it, or, for TensorRT, it is built on a machine with TensorRT)")
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    assert versions, f"{model_dir} has no numbered version folder (1/, 2/, ...)"
    for version in versions:
        # a Python-based backend's model.py is the backend's, shared by every model that names it
        source = COURSE_BACKENDS.get(config.backend) or version / "model.py"
        assert source.is_file(), f"{version} has no model.py"
        code = compile(source.read_text(), str(source), "exec")
        tree = ast.parse(source.read_text())
        assert any(isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel" for n in tree.body), (
            f"{source} defines no TritonPythonModel")
        assert code is not None


@pytest.mark.parametrize("typo,where", [
    ("max_batch_sise: 32", "max_batch_sise"),  # a misspelt field
    ("kind: KIND_CPUU", "KIND_CPUU"),  # a misspelt enum value
    ('data_type: TYPE_FP32 dims: [ 64 ] } ]\noutput [ { name: "OUTPUT__0"', None),  # a bracket left open
])
def test_a_typo_fails_to_parse(tmp_path, typo, where):
    text = (LAB21 / "model_repository/mlp/config.pbtxt").read_text()
    broken = {"max_batch_sise: 32": text.replace("max_batch_size: 32", typo),
              "kind: KIND_CPUU": text.replace("kind: KIND_CPU", typo),
              }.get(typo, text.replace('data_type: TYPE_FP32 dims: [ 64 ] } ]', 'data_type: TYPE_FP32 dims: [ 64 ] }', 1))
    assert broken != text
    (tmp_path / "config.pbtxt").write_text(broken)
    with pytest.raises(text_format.ParseError) as info:
        triton.parse_config(tmp_path)
    if where:
        assert where in str(info.value)


def test_copy_model_fills_parameters_renames_versions_and_skips_caches(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(LAB21 / "model_repository" / "scaler", source / "scaler")
    (source / "scaler" / "1" / "__pycache__").mkdir()
    (source / "scaler" / "1" / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"x")
    target = triton.copy_model(source, "scaler", tmp_path / "run", name="scaler_copy",
                               parameters={"owner": 'me "quoted"'}, versions={1: [2, 5]},
                               replace={"max_batch_size: 8": "max_batch_size: 4"}, append="dynamic_batching { }")
    assert sorted(p.name for p in target.iterdir()) == ["2", "5", "config.pbtxt"]
    assert not (target / "2" / "__pycache__").exists()
    assert (target / "5" / "model.py").read_text() == (source / "scaler" / "1" / "model.py").read_text()
    config = triton.parse_config(target)
    assert config.parameters["owner"].string_value == 'me "quoted"'
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    diff = triton.diff_text(source / "scaler" / "config.pbtxt", target / "config.pbtxt", context=0)
    assert "-max_batch_size: 8" in diff and "+max_batch_size: 4" in diff and "+dynamic_batching { }" in diff
    assert triton.diff_text("same\n", "same\n") == ""
    with pytest.raises(KeyError, match="ownr"):
        triton.copy_model(source, "scaler", tmp_path / "run", parameters={"ownr": "x"})
    with pytest.raises(ValueError, match="does not occur"):
        triton.copy_model(source, "scaler", tmp_path / "run", replace={"max_batch_size: 99": "x"})
    with pytest.raises(FileNotFoundError):
        triton.copy_model(source, "scaler", tmp_path / "run", versions={7: 1})
    with pytest.raises(text_format.ParseError):  # validate: a substitution that breaks the syntax is caught
        triton.copy_model(source, "scaler", tmp_path / "run", replace={"max_batch_size: 8": "max_batch_size: eight"})


def test_model_py_keeps_the_helpers_build_mlp():
    def function_source(text):
        node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "build_mlp")
        return ast.dump(node)

    import inspect
    import textwrap

    assert function_source(H.mlp_model_py()) == function_source(textwrap.dedent(inspect.getsource(H.build_mlp)))


def test_both_labs_ship_the_same_doubler():
    for relative in ("config.pbtxt", "1/model.py"):
        assert ((LAB21 / "model_repository/doubler" / relative).read_text()
                == (LAB22 / "model_repository/doubler" / relative).read_text())


@pytest.mark.parametrize("text", [
    H.mlp_config(hidden=8), H.mlp_config(hidden=8, device="cuda", instance_count=2, dynamic_batching=True),
    H.mlp_config(hidden=8, dynamic_batching={"max_queue_delay_microseconds": 200, "preferred_batch_size": [4, 8]}),
    H.libtorch_config(device="cuda"), mm.llm_config("/some/model", kind="KIND_GPU", temperature=0.7),
    mm.sleeper_config(base_ms=30, per_item_ms=1, max_batch_size=8, instance_count=2,
                      extra="dynamic_batching { default_queue_policy { max_queue_size: 2 timeout_action: REJECT } }",
                      instance_extra='rate_limiter { resources [ { name: "R" count: 1 } ] }'),
    mm.CLASSIFIER_CONFIG + "version_policy: { all { } }\n",
])
def test_the_helpers_per_run_configs_parse(text):
    from tritonclient.grpc import model_config_pb2

    text_format.Parse(text, model_config_pb2.ModelConfig())


def test_helper_values_land_in_the_parsed_config():
    llm = text_format.Parse(mm.llm_config("/m", kind="KIND_GPU", max_tokens=7),
                            __import__("tritonclient.grpc.model_config_pb2", fromlist=["x"]).ModelConfig())
    assert llm.parameters["model_dir"].string_value == "/m" and llm.parameters["max_tokens"].string_value == "7"
    assert llm.instance_group[0].kind == llm.instance_group[0].KIND_GPU and llm.model_transaction_policy.decoupled
    mlp = text_format.Parse(H.mlp_config(hidden=48, max_batch_size=16), type(llm)())
    assert mlp.parameters["hidden"].string_value == "48" and mlp.max_batch_size == 16


# -- the files as they are, on the real server --------------------------------------------------------

needs_triton = pytest.mark.skipif(triton.pytriton_root() is None,
                                  reason="nvidia-pytriton is not installed (make env installs it)")


@needs_triton
@pytest.mark.parametrize("lab,models", [
    (LAB21, ["doubler", "mlp", "scaler", "self_describing"]),
    (LAB22, ["doubler", "sleeper"]),
    (LAB23, ["py_torch_eager"]),
], ids=["Lab-2.1", "Lab-2.2", "Lab-2.3"])
def test_lab_models_load_and_answer_from_the_files_as_they_are(tmp_path, lab, models):
    """The lab folder copied unchanged (the NGC container would mount it): the models that need no
    per-run file load and answer. (mlp builds its weights from its seed when 1/weights.pt is absent;
    clf needs weights.npz and llm a model folder; Lab 2.3's py_torch_eager builds its CNN from its seed, the
    other runtimes need the artefacts the notebook exports.)"""
    import tritonclient.http as httpclient

    repo = shutil.copytree(lab / "model_repository", tmp_path / "model_repository",
                           ignore=shutil.ignore_patterns("__pycache__"))
    with triton.triton_server(repo, model_control_mode="explicit", load_models=models, exit_timeout_s=2) as server:
        client = httpclient.InferenceServerClient(triton.http_url(server), network_timeout=300)
        try:
            for name in models:
                assert client.is_model_ready(name), name
            if "mlp" in models:
                x = np.random.default_rng(0).standard_normal((3, H.IN_FEATURES)).astype(np.float32)
                inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                got = client.infer("mlp", [inp]).as_numpy("OUTPUT__0")
                import torch

                with torch.no_grad():
                    expected = H.make_mlp(512, seed=0)(torch.from_numpy(x)).numpy()
                assert np.allclose(got, expected, atol=1e-5)  # the seeded weights are make_mlp's
            if "py_torch_eager" in models:
                import torch

                import backend_integration_helpers as B

                x = B.images(3)
                inp = httpclient.InferInput(B.INPUT, list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                got = client.infer("py_torch_eager", [inp]).as_numpy(B.OUTPUT)
                with torch.no_grad():
                    expected = B.make_cnn(16, seed=0)(torch.from_numpy(x)).numpy()
                assert np.allclose(got, expected, atol=1e-5)  # the seeded weights are make_cnn's
            if "doubler" in models:
                x = np.array([[1.0, -2.0, 3.5]], dtype=np.float32)
                inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                assert np.array_equal(client.infer("doubler", [inp]).as_numpy("OUTPUT0"), 2 * x)
        finally:
            client.close()
