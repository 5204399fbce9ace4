"""Tests of Triton Lab 2.1's helpers: config.pbtxt builder, the MLP served by the Python backend,
the broken repositories, the TorchScript artifact and the perf_analyzer CSV reader.

One real tritonserver (bundled in nvidia-pytriton) serves the module; loading a Python-backend model
starts a Python process that imports torch (a few seconds on 2 cores), so the file takes ~30 s.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_course import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "02-Labs/Triton_Track/Lab-2.1-Triton_Server_Basics"))

import triton_basics_helpers as H  # noqa: E402

needs_triton = pytest.mark.skipif(triton.pytriton_root() is None,
                                  reason="nvidia-pytriton is not installed (make env installs it)")


# -- pure functions -----------------------------------------------------------------------------------

def test_config_pbtxt_writes_every_field_in_text_format():
    text = H.config_pbtxt(
        backend="python", max_batch_size=16,
        inputs=[H.tensor("IN", "TYPE_FP32", [-1, 3])], outputs=[H.tensor("OUT", "TYPE_INT64", [1])],
        instance_count=2, kind="KIND_GPU", gpus=[0], version_policy="latest { num_versions: 2 }",
        dynamic_batching={"max_queue_delay_microseconds": 100, "preferred_batch_size": [4, 8]},
        parameters={"hidden": 64},
    )
    assert 'backend: "python"' in text and "max_batch_size: 16" in text
    assert '{ name: "IN" data_type: TYPE_FP32 dims: [ -1, 3 ] }' in text
    assert "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0 ] } ]" in text
    assert "version_policy: { latest { num_versions: 2 } }" in text
    assert "dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 4, 8 ] }" in text
    assert 'parameters { key: "hidden" value: { string_value: "64" } }' in text
    assert H.config_pbtxt(backend="python", dynamic_batching=True).endswith("dynamic_batching { }\n")
    with pytest.raises(ValueError):
        H.config_pbtxt()


def test_mlp_config_follows_the_device():
    assert "KIND_CPU" in H.mlp_config(hidden=8, device="cpu") and "gpus" not in H.mlp_config(hidden=8)
    gpu = H.mlp_config(hidden=8, device="cuda", instance_count=2)
    assert "kind: KIND_GPU count: 2 gpus: [ 0 ]" in gpu


def test_make_mlp_is_deterministic_and_model_py_is_self_contained():
    a, b = H.make_mlp(32, seed=3), H.make_mlp(32, seed=3)
    x = torch.randn(2, H.IN_FEATURES)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), H.make_mlp(32, seed=4)(x))
    source = H.mlp_model_py()
    assert "def build_mlp(" in source and "class TritonPythonModel" in source
    compile(source, "model.py", "exec")


def test_torchscript_export_round_trips_with_another_batch_size(tmp_path):
    model = H.make_mlp(16)
    model_dir = H.write_libtorch_model(tmp_path, "m", model, torch.randn(4, H.IN_FEATURES))
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in config and "INPUT__0" in config and "OUTPUT__0" in config
    loaded = torch.jit.load(str(model_dir / "1" / "model.pt"))
    probe = torch.randn(7, H.IN_FEATURES)
    with torch.no_grad():
        assert torch.allclose(loaded(probe), model(probe), atol=1e-6)


def test_read_perf_analyzer_csv_converts_microseconds(tmp_path):
    csv = tmp_path / "pa.csv"
    csv.write_text(
        "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
        "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
        "Avg latency,request/response,response wait\n"
        "8,1500.5,10,200,300,20,700,15,5,4000,5000,6000,9000,4200,1500,100\n"
        "1,600.0,10,200,10,20,700,15,5,1500,1700,1800,2500,1550,600,90\n")
    df = H.read_perf_analyzer_csv(csv)
    assert df["concurrency"].tolist() == [1, 8]
    top = df.iloc[1]
    assert top["throughput_rps"] == 1500.5 and top["p50_ms"] == 4.0 and top["p99_ms"] == 9.0
    assert top["mean_ms"] == 4.2 and top["server_queue_ms"] == 0.3


def test_perf_analyzer_command_has_one_concurrency_and_csv():
    cmd = H.perf_analyzer_command("m", "127.0.0.1:8001", "/tmp/x.csv", concurrency=8)
    assert cmd[:3] == ["perf_analyzer", "-m", "m"]
    joined = " ".join(cmd)
    assert "-i grpc" in joined and "--concurrency-range 8:8" in joined and "-f /tmp/x.csv" in joined
    assert "--measurement-interval 3000" in joined and "--stability-percentage 20" in joined


def test_metric_samples_parse_prometheus_text():
    text = ('# HELP nv_inference_count Number of inferences\n# TYPE nv_inference_count counter\n'
            'nv_inference_count{model="a",version="1"} 5\nnv_inference_count{model="b",version="1"} 2\n'
            '# HELP other x\n# TYPE other gauge\nother 1\n')
    rows = H.metric_samples(text)
    assert [(r["labels"]["model"], r["value"]) for r in rows] == [("a", 5.0), ("b", 2.0)]


def test_stats_summary_averages_per_request():
    stats = {"name": "m", "version": "1", "inference_count": 6, "execution_count": 3,
             "inference_stats": {"success": {"count": 4, "ns": 0}, "fail": {"count": 1, "ns": 0},
                                 "queue": {"count": 4, "ns": 8_000_000}, "compute_input": {"count": 0, "ns": 0},
                                 "compute_infer": {"count": 4, "ns": 4_000_000},
                                 "compute_output": {"count": 4, "ns": 0}},
             "batch_stats": [{"batch_size": 2, "compute_infer": {"count": 3, "ns": 1}}]}
    summary = H.stats_summary(stats)
    assert summary["requests"] == 4 and summary["failed"] == 1
    assert summary["queue_ms"] == 2.0 and summary["compute_infer_ms"] == 1.0 and summary["avg_batch"] == 2.0
    assert H.batch_stats(stats) == {2: 3}


# -- a real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    model = H.make_mlp(64, seed=0)
    H.write_mlp_model(repo, "mlp", model, dynamic_batching={"max_queue_delay_microseconds": 20000})
    H.write_broken_models(repo)
    H.write_model_dir(repo, "scaler", H.config_pbtxt(
        backend="python", max_batch_size=4, inputs=[H.tensor("INPUT0", "TYPE_FP32", [-1])],
        outputs=[H.tensor("OUTPUT0", "TYPE_FP32", [-1])], version_policy="specific { versions: [2] }"),
        {"model.py": H.SCALER_MODEL_PY}, versions=(1, 2, 3))
    with triton.triton_server(repo, model_control_mode="explicit", strict_model_config=False,
                              load_models=["mlp"]) as server:
        import tritonclient.http as httpclient

        # Loads start a Python process each; a busy 2-core runner can take long, hence the timeout.
        client = httpclient.InferenceServerClient(triton.http_url(server), network_timeout=300)
        yield server, client, model
        client.close()
    assert not server.running()


@needs_triton
def test_served_mlp_matches_pytorch_and_batches_concurrent_requests(served):
    import tritonclient.grpc as grpcclient

    server, client, model = served
    rows = np.random.default_rng(1).standard_normal((12, H.IN_FEATURES)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).numpy()
    grpc = grpcclient.InferenceServerClient(triton.grpc_url(server))
    answers = {}
    for i in range(len(rows)):
        inp = grpcclient.InferInput("INPUT__0", [1, H.IN_FEATURES], "FP32")
        inp.set_data_from_numpy(rows[i:i + 1])
        grpc.async_infer("mlp", [inp], callback=lambda result, error, i=i: answers.__setitem__(i, (result, error)))
    import time

    deadline = time.monotonic() + 30
    while len(answers) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.01)
    grpc.close()
    assert all(answers[i][1] is None for i in range(len(rows)))
    got = np.concatenate([answers[i][0].as_numpy("OUTPUT__0") for i in range(len(rows))])
    assert np.allclose(got, expected, atol=1e-5)
    stats = client.get_inference_statistics("mlp")["model_stats"][0]
    assert max(H.batch_stats(stats)) > 1  # 12 requests within a 20 ms queue delay share executions


@needs_triton
def test_broken_models_fail_to_load_with_their_reason(served):
    from tritonclient.utils import InferenceServerException

    _, client, _ = served
    expected = {"dims_mismatch": "but the model configuration specifies dims [3]",
                "missing_version": "at least one version must be available",
                "wrong_backend": "unable to find backend library for backend 'pyhton'"}
    for name, reason in expected.items():
        with pytest.raises(InferenceServerException) as info:
            client.load_model(name)
        assert reason in info.value.message(), info.value.message()


@needs_triton
def test_version_policy_serves_only_the_chosen_version(served):
    import tritonclient.http as httpclient

    _, client, _ = served
    client.load_model("scaler")
    assert H.ready_versions(client, "scaler") == [2]
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(x)
    assert np.array_equal(client.infer("scaler", [inp]).as_numpy("OUTPUT0"), 2 * x)  # the version answers
