"""Lab 2.1 helper module: KV-cache arithmetic, the batching client policy, memory sampling, and the
parsers for vLLM's messages (checked against the text vLLM prints)."""
import json
import math
import os
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "02-Labs" / "vLLM_Track" / "Lab-2.1-vLLM_Deployment"
sys.path.insert(0, str(LAB))

import vllm_deployment_helpers as H  # noqa: E402

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "hidden_size": 4096, "head_dim": 128}


def test_kv_bytes_per_token_llama_8b_is_128_kib_in_bf16():
    # 2 x 32 layers x 8 kv heads x 128 x 2 bytes = 131072 bytes, the published figure for Llama-3-8B.
    assert H.kv_bytes_per_token(LLAMA_8B, "bfloat16") == 131072
    assert H.kv_bytes_per_token(LLAMA_8B, "torch.float32") == 2 * 131072


def test_kv_bytes_per_token_defaults_head_dim_and_kv_heads():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}  # MHA, head_dim 16
    assert H.kv_bytes_per_token(cfg, "float16") == 2 * 2 * 4 * 16 * 2


def test_kv_bytes_per_token_reads_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    assert H.kv_bytes_per_token(tmp_path, "bfloat16") == 131072


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype"):
        H.dtype_bytes("float12")


def test_kv_cache_plan_counts_whole_blocks_and_full_length_sequences():
    plan = H.kv_cache_plan(kv_cache_bytes=10 * 16 * 100 + 99, bytes_per_token=100, block_size=16,
                           max_model_len=40)
    assert plan.block_bytes == 1600
    assert plan.num_blocks == 10  # the last 99 bytes do not make a block
    assert plan.tokens == 160
    assert plan.max_concurrency == pytest.approx(10 / 3)  # 40 tokens need ceil(40/16) = 3 blocks


def test_kv_cache_plan_rejects_zero_sizes():
    with pytest.raises(ValueError):
        H.kv_cache_plan(1000, 0, 16, 10)


def test_parse_kv_capacity_log_line():
    line = ("INFO 11-24 06:00:00 [kv_cache_utils.py:1234] CPU KV cache size: 155,776 tokens, "
            "Maximum concurrency for 2,048 tokens per request: 76.06x")
    assert H.parse_kv_capacity_log(line) == {"tokens": 155776, "max_model_len": 2048, "max_concurrency": 76.06}
    assert H.parse_kv_capacity_log("nothing here") is None


def test_parse_kv_too_small_error_matches_vllms_message():
    message = ("ValueError: To serve at least one request with the model's max seq len (8192), (0.35 GiB KV "
               "cache is needed, which is larger than the available KV cache memory (0.04 GiB). Based on the "
               "available memory, the estimated maximum model length is 1024. Try increasing "
               "`gpu_memory_utilization` ...")
    assert H.parse_kv_too_small_error(message) == {"max_model_len": 8192, "needed_gib": 0.35,
                                                   "available_gib": 0.04, "estimated_max_len": 1024}
    assert H.parse_kv_too_small_error("ValueError: something else") is None
    assert H.error_line("a\nValueError: first\nb\nValueError: last\n") == "ValueError: last"


def test_continuous_policy_sends_everything_that_has_arrived():
    arrivals = [0.0, 0.1, 0.2, 5.0]
    assert H.release_order("continuous", 0.15, arrivals, next_index=0, in_flight=0) == 2
    assert H.release_order("continuous", 0.15, arrivals, next_index=2, in_flight=2) == 0
    assert H.release_order("continuous", 0.25, arrivals, next_index=2, in_flight=2) == 1


def test_static_policy_waits_for_a_full_batch_and_for_the_previous_batch():
    arrivals = [0.0, 0.1, 0.2, 0.3, 0.4]
    assert H.release_order("static", 0.15, arrivals, 0, 0, batch_size=3) == 0  # only 2 arrived
    assert H.release_order("static", 0.25, arrivals, 0, 0, batch_size=3) == 3
    assert H.release_order("static", 0.45, arrivals, 3, in_flight=1, batch_size=3) == 0  # batch running
    assert H.release_order("static", 0.45, arrivals, 3, in_flight=0, batch_size=3) == 2  # last, smaller
    assert H.release_order("static", 0.45, arrivals, 5, in_flight=0, batch_size=3) == 0
    with pytest.raises(ValueError):
        H.release_order("dynamic", 0, arrivals, 0, 0)


class FakeOutput:
    def __init__(self, request_id, tokens, finished):
        self.request_id, self.finished = request_id, finished
        self.outputs = [type("C", (), {"token_ids": list(range(tokens))})()]


class FakeEngine:
    """A stand-in with LLMEngine's add_request/step contract: each step makes one token for every
    request in flight; a request finishes after `n` tokens. Records the batch of every step."""

    def __init__(self, n):
        self.n, self.live, self.batches = n, {}, []

    def add_request(self, request_id, prompt, params):
        self.live[request_id] = 0

    def step(self):
        time_step = 0.01
        import time
        time.sleep(time_step)
        self.batches.append(sorted(self.live))
        out = []
        for rid in list(self.live):
            self.live[rid] += 1
            done = self.live[rid] >= self.n
            out.append(FakeOutput(rid, self.live[rid], done))
            if done:
                del self.live[rid]
        return out


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_drive_engine_records_a_complete_timeline(policy):
    llm = type("L", (), {"llm_engine": FakeEngine(n=10)})()
    arrivals = [0.0, 0.0, 0.05, 0.06]
    lines = H.drive_engine(llm, ["p"] * 4, None, arrivals, policy, batch_size=2)
    for line in lines:
        assert line.output_tokens == 10
        assert line.arrival <= line.sent <= line.first_token <= line.finished
        assert line.latency >= line.ttft > 0
    batches = llm.llm_engine.batches
    if policy == "static":  # never more than one closed batch in the engine
        assert all(len(b) <= 2 for b in batches)
        assert not any({"req-static-0", "req-static-2"} <= set(b) for b in batches)
    else:  # the late arrivals join while the first two are still running
        assert any({"req-continuous-0", "req-continuous-2"} <= set(b) for b in batches)


def test_peak_rss_sees_a_temporary_allocation():
    import mmap
    import time

    # A fresh anonymous mapping: a bytearray could reuse heap memory that an allocator (e.g. the
    # tcmalloc vLLM preloads) kept resident after earlier tests, and then RSS would not move.
    with H.PeakRSS(interval=0.001) as mem:
        block = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        deadline = time.monotonic() + 10  # on a loaded machine the sampler thread may run late
        while mem.peak - mem.baseline < 48 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    assert mem.delta >= 48 * 2**20
    assert mem.peak >= mem.baseline


def test_engine_core_rss_is_zero_without_an_engine():
    assert H.engine_core_rss() == 0


def test_vllm_bench_serve_args_describe_a_fixed_length_random_workload():
    args = H.vllm_bench_serve_args("http://127.0.0.1:8000/v1", "/m", num_prompts=8, input_len=128, output_len=32,
                                   max_concurrency=4, result_dir="/tmp/x", percentiles=(50, 99))
    joined = " ".join(args)
    assert "--base-url http://127.0.0.1:8000 " in joined
    assert "--random-range-ratio 0" in joined and "--ignore-eos" in args
    assert "--max-concurrency 4" in joined and "--metric-percentiles 50,99" in joined


def test_bench_shim_parses_these_arguments_with_vllms_own_parser():
    pytest.importorskip("vllm")
    import argparse

    from vllm.benchmarks.serve import add_cli_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(H.vllm_bench_serve_args("http://h:1", "/m", num_prompts=8, input_len=128,
                                                     output_len=32, max_concurrency=4, result_dir="/tmp/x"))
    assert args.max_concurrency == 4 and args.ignore_eos and args.num_prompts == 8
    assert args.random_input_len == 128 and args.random_output_len == 32 and args.temperature == 0


def test_vllm_bench_serve_is_the_packages_runner(monkeypatch):
    from inference_course import bench

    assert H.vllm_bench_serve_args is bench.vllm_bench_serve_args
    seen = {}

    def fake(base_url, model, **kw):
        seen.update(base_url=base_url, model=model, **kw)
        return {"output_throughput": 1.0}

    monkeypatch.setattr(bench, "vllm_bench_serve", fake)
    assert H.vllm_bench_serve("http://h:1", "/m", num_prompts=4, max_concurrency=2, timeout=9) == {"output_throughput": 1.0}
    assert seen == {"base_url": "http://h:1", "model": "/m", "num_prompts": 4, "max_concurrency": 2, "timeout": 9}


def test_compare_with_vllm_bench_ratio():
    df = H.compare_with_vllm_bench({"output_throughput": 100.0, "median_ttft_ms": 20.0},
                                   {"output_throughput": 50.0, "median_ttft_ms": 10.0})
    assert df.loc["output throughput (tok/s)", "ratio (course / vllm)"] == 2.0
    assert math.isnan(df.loc["p99 ITL (ms)", "inference_course.bench"])


class WordTokenizer:
    """One token per word."""

    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


def test_random_token_prompts_have_the_exact_length_and_differ():
    prompts = H.random_token_prompts(WordTokenizer(), n=5, length=37, seed=1)
    assert [len(p) for p in prompts] == [37] * 5
    assert len({tuple(p[:8]) for p in prompts}) == 5
    assert prompts == H.random_token_prompts(WordTokenizer(), n=5, length=37, seed=1)
    assert len(H.random_text_prompts(WordTokenizer(), 2, 10)[0].split()) == 10


def test_parse_kv_too_small_error_without_estimate():
    message = ("To serve at least one request with the model's max seq len (4096), (1.5 GiB KV cache is needed, "
               "which is larger than the available KV cache memory (0.5 GiB). Try increasing ...")
    assert H.parse_kv_too_small_error(message)["estimated_max_len"] is None


def test_cpu_node_total_memory_is_positive_and_at_most_the_machine():
    import psutil

    assert 0 < H.cpu_node_total_memory() <= psutil.virtual_memory().total * 1.01


def test_wait_for_gpu_memory_release_returns_none_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        assert 0.0 <= H.wait_for_gpu_memory_release(1.0, timeout=1) <= 1.0
    else:
        assert H.wait_for_gpu_memory_release() is None


def test_engine_rss_reads_this_process_when_no_engine_core_child_runs():
    baseline = H.process_rss()
    block = bytearray(os.urandom(1)) * (200 * 2**20)  # 200 MiB, every page written
    grown, where = H.engine_rss(baseline)
    assert "this process" in where
    assert grown >= 150 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB after writing 200 MiB"
    del block
