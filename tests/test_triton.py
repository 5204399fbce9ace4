import os
import time
import urllib.request

import numpy as np
import pytest

from inference_course import triton
from inference_course.servers import ServerError

pytestmark = pytest.mark.skipif(triton.pytriton_root() is None,
                                reason="nvidia-pytriton is not installed (make env installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    triton.write_model(repo, "doubler", triton.DOUBLER_CONFIG, triton.DOUBLER_MODEL)
    with triton.triton_server(repo) as running:
        yield running
    assert not running.running()


def test_bundled_binary_and_backend_stub_are_found():
    binary = triton.find_tritonserver()
    assert binary.name == "tritonserver" and os.access(binary, os.X_OK)
    backends = triton.backend_directory()
    assert (backends / "python" / "triton_python_backend_stub").exists()
    assert (backends / "python" / "libtriton_python.so").exists()


def test_missing_binary_message_has_the_fix(monkeypatch):
    monkeypatch.setenv(triton.ENV_BINARY, "/no/such/tritonserver")
    with pytest.raises(ServerError, match="not an executable file. Fix: unset TRITONSERVER_BIN"):
        triton.find_tritonserver()


def test_http_and_grpc_inference_through_dlpack(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
    http = httpclient.InferenceServerClient(triton.http_url(server))
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    assert np.array_equal(http.infer("doubler", [inp]).as_numpy("OUTPUT0"), 2 * x)

    grpc = grpcclient.InferenceServerClient(triton.grpc_url(server))
    ginp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    assert np.array_equal(grpc.infer("doubler", [ginp]).as_numpy("OUTPUT0"), 2 * x)
    assert grpc.is_model_ready("doubler")


def test_servers_bind_loopback_only(server):
    assert all(f"{flag}=127.0.0.1" in server.cmd for flag in ("--http-address", "--grpc-address", "--metrics-address"))


def test_metrics_endpoint_parses_and_counts_requests(server):
    from prometheus_client.parser import text_string_to_metric_families

    def successes():
        text = urllib.request.urlopen(triton.metrics_url(server), timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "nv_inference_request_success":
                return sum(s.value for s in family.samples if s.labels.get("model") == "doubler")
        return None

    import tritonclient.http as httpclient

    # The requests of earlier tests may still be uncounted: read the count once it holds still.
    before, deadline = successes(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = successes()
        if again == before:
            break
        before = again
    assert before is not None
    client = httpclient.InferenceServerClient(triton.http_url(server))
    inp = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    client.infer("doubler", [inp])
    # Triton counts a request just after answering it: a scrape right after the answer can miss it (a CI
    # run on 2026-11-30 did). Wait (at most 10 s) for the count to move, then check it moved by exactly one.
    deadline = time.monotonic() + 10
    after = successes()
    while after == before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = successes()
    assert after == before + 1, (before, after)


def test_broken_config_fails_with_the_servers_reason(tmp_path):
    bad = triton.DOUBLER_CONFIG.replace('backend: "python"', 'backend: "no_such_backend"')
    triton.write_model(tmp_path, "broken", bad, triton.DOUBLER_MODEL)
    with pytest.raises(ServerError) as info:
        with triton.triton_server(tmp_path, startup_timeout=60):
            pass
    assert "no_such_backend" in str(info.value)


def test_server_env_puts_this_interpreters_libpython_first():
    import sysconfig

    env = triton.server_env()
    own = sysconfig.get_config_var("LIBDIR")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this interpreter has no shared libpython")
    assert own in env["LD_LIBRARY_PATH"].split(os.pathsep)


def test_tree_lists_a_repository_as_tree_would_without_pycache(tmp_path):
    repo = tmp_path / "model_repository"
    (repo / "b_model" / "1").mkdir(parents=True)
    (repo / "b_model" / "1" / "model.py").write_text("")
    (repo / "b_model" / "1" / "__pycache__").mkdir()
    (repo / "b_model" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    (repo / "b_model" / "config.pbtxt").write_text("")
    (repo / "a_model").mkdir()
    assert triton.tree(repo).splitlines() == [
        "model_repository/",
        "    a_model/",
        "    b_model/",
        "        1/",
        "            model.py",
        "        config.pbtxt",
    ]
