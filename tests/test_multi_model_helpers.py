"""Tests for the Triton Lab 2.2 helper: real tritonserver runs (bundled in nvidia-pytriton)."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inference_course import triton

LAB = Path(__file__).resolve().parent.parent / "02-Labs" / "Triton_Track" / "Lab-2.2-Multi_Model_Management"
sys.path.insert(0, str(LAB))
import multi_model_helpers as mm  # noqa: E402

pytestmark = pytest.mark.skipif(triton.pytriton_root() is None,
                                reason="nvidia-pytriton is not installed (make env installs it)")


def test_sticky_buckets_are_stable_and_monotonic():
    users = [f"user-{i}" for i in range(2000)]
    gw = mm.ABGateway("127.0.0.1:1", "m", {"2": 0.1, "1": 0.9})
    first = {u: gw.choose(u) for u in users}
    assert first == {u: gw.choose(u) for u in users}  # sticky
    share = sum(v == "2" for v in first.values()) / len(users)
    assert 0.07 < share < 0.13
    gw.set_weights({"2": 0.5, "1": 0.5})
    second = {u: gw.choose(u) for u in users}
    # raising the candidate's share only moves users to the candidate
    assert all(second[u] == "2" for u in users if first[u] == "2")
    assert 0.45 < sum(v == "2" for v in second.values()) / len(users) < 0.55


def test_numpy_training_learns_the_task_and_the_mlp_beats_the_linear_model():
    X, y = mm.make_moons(600, seed=0)
    Xt, yt = mm.make_moons(600, seed=1)
    linear = (mm.predict(mm.train_mlp(X, y), Xt) == yt).mean()
    mlp = (mm.predict(mm.train_mlp(X, y, hidden=16), Xt) == yt).mean()
    assert 0.75 < linear < mlp and mlp > 0.9


def test_confidence_intervals_cover_the_truth_and_detect_a_difference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 1, 400), rng.normal(10.5, 1, 400)
    est, low, high = mm.bootstrap_diff_ci(a, b)
    assert low < 0.5 < high and low > 0
    est, low, high = mm.proportion_diff_ci(80, 100, 80, 100)
    assert est == 0 and low < 0 < high
    est, low, high = mm.proportion_diff_ci(50, 100, 90, 100)
    assert low > 0


@pytest.fixture(scope="module")
def classifier_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    X, y = mm.make_moons(400, seed=0)
    good = mm.train_mlp(X, y, hidden=16, steps=300)
    mm.write_classifier_version(repo, "clf", 1, good)
    mm.write_classifier_version(repo, "clf", 2, good)
    mm.write_classifier_version(repo, "clf", 3, good, behavior={"error_rate": 0.3})
    mm.write_classifier_version(repo, "clf", 4, good, behavior={"delay_ms": 300})
    config = mm.CLASSIFIER_CONFIG + "version_policy: { all { } }\n"
    (repo / "clf" / "config.pbtxt").write_text(config)
    with mm.start_server(repo, model_control_mode="explicit", load_models=["clf"]) as server:
        yield server
    assert not server.running()


def test_classifier_versions_answer_and_the_bad_one_fails_sometimes(classifier_server):
    X, y = mm.make_moons(60, seed=5)
    gw = mm.ABGateway(triton.http_url(classifier_server), "clf", {"1": 1.0})
    for version in ("1", "3"):
        gw.set_weights({version: 1.0})
        for xi, yi in zip(X, y):
            gw.infer(xi, label=int(yi))
    df = gw.table()
    v1, v3 = df[df.version == "1"], df[df.version == "3"]
    assert v1.ok.all() and v1.correct.mean() > 0.8
    assert 0 < (~v3.ok).sum() < len(v3)
    assert "injected failure" in v3[~v3.ok].error.iloc[0]


def _controller(server, candidate, log):
    gw = mm.ABGateway(triton.http_url(server), "clf", {"1": 1.0})
    X, y = mm.make_moons(200, seed=3)
    counter = iter(range(10 ** 6))

    def send():
        i = next(counter) % len(X)
        gw.infer(X[i], user_id=f"u{i}", label=int(y[i]))

    gates = mm.Gates(max_error_rate=0.05, max_p95_ms=150, min_requests=20)
    return mm.CanaryController(gw, "1", candidate, send, gates=gates, steps=(0.2, 0.5, 1.0), log=log.append,
                               warmup=lambda v: gw.infer(X[0], version=v, record=False)), gw


@pytest.mark.parametrize("candidate,expected,why", [("2", "promoted", "all gates"), ("3", "rolled back", "error rate"),
                                                    ("4", "rolled back", "p95")])
def test_canary_promotes_the_good_version_and_rolls_back_bad_ones(classifier_server, candidate, expected, why):
    log = []
    controller, gw = _controller(classifier_server, candidate, log)
    assert controller.run() == expected, log
    assert why in log[-1]
    final = controller.decisions[-1]
    if expected == "promoted":
        assert [d.action for d in controller.decisions] == ["continue", "continue", "promote"]
        assert gw.weights == {"2": 1.0}
    else:
        assert final.action == "rollback" and gw.weights == {"1": 1.0}
        assert len(controller.decisions) == 1  # caught at the first step


def test_rollback_when_candidate_is_not_ready(classifier_server):
    log = []
    controller, gw = _controller(classifier_server, "9", log)
    assert controller.run() == "rolled back"
    assert "not ready" in log[0] and gw.weights == {"1": 1.0}


def test_set_served_versions_unloads_the_others(tmp_path):
    X, y = mm.make_moons(100, seed=0)
    layers = mm.train_mlp(X, y, steps=20)
    for v in (1, 2, 3):
        mm.write_classifier_version(tmp_path, "clf", v, layers)
    import tritonclient.http as httpclient

    with mm.start_server(tmp_path, model_control_mode="explicit", load_models=["clf"]) as server:
        client = httpclient.InferenceServerClient(triton.http_url(server))
        assert [client.is_model_ready("clf", str(v)) for v in (1, 2, 3)] == [False, False, True]  # latest 1
        mm.set_served_versions(client, "clf", [1, 2])
        assert [client.is_model_ready("clf", str(v)) for v in (1, 2, 3)] == [True, True, False]
        assert mm.process_tree_rss(server.pid) > 0
        client.close()


def test_sleeper_batches_with_dynamic_batching_and_rejects_when_queue_full(tmp_path):
    from inference_course.bench import closed_loop
    import tritonclient.http as httpclient

    mm.write_sleeper(tmp_path, "sleeper", base_ms=30, per_item_ms=1, max_batch_size=8,
                     extra="dynamic_batching { max_queue_delay_microseconds: 5000 "
                           "default_queue_policy { max_queue_size: 2 timeout_action: REJECT "
                           "default_timeout_microseconds: 10000000 } }")
    with mm.start_server(tmp_path) as server:
        client = httpclient.InferenceServerClient(triton.http_url(server))
        before = mm.model_stats(client, "sleeper")
        result = closed_loop(mm.sleeper_call(triton.http_url(server)), 8, duration_s=1.5)
        delta = mm.stats_delta(before, mm.model_stats(client, "sleeper"))
        client.close()
    assert delta["avg_batch_rows"] > 1.5  # requests were batched
    assert result.errors and "queue" in result.errors[0].lower()  # full queue rejects
    assert delta["success"] == len(result.latencies_s) and delta["fail"] == 0  # rejected before a batch


@pytest.mark.engine
def test_llm_streams_one_response_per_token(tmp_path):
    from inference_course.models import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    mm.write_llm_model(tmp_path, "llm", model_dir, max_tokens=8)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with mm.start_server(tmp_path) as server:
        result = mm.stream_generate(triton.grpc_url(server), "llm", ids, max_tokens=6)
    assert 1 <= len(result.token_ids) <= 6
    assert result.arrival_s == sorted(result.arrival_s) and result.ttft_s < result.total_s
    # the same greedy tokens as transformers' own generate
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    import torch
    ref = model.generate(torch.tensor([ids]), max_new_tokens=len(result.token_ids), do_sample=False)
    assert result.token_ids == ref[0, len(ids):].tolist()
