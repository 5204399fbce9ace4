"""Where does architecture (a)'s time go? Sample the front-end process of native `vllm serve` and of the
course's service (a) with py-spy while the same load runs against each (issue 10, vLLM Lab 2.3/03).

Both front ends do the same kind of work in one Python process: HTTP, tokenization, the engine client
(AsyncLLM: its output handler and detokenizer run in that process; EngineCore runs in a child process).
py-spy samples every thread of the front-end process (not its children) `RATE` times a second, without
idle samples, so a thread's sample count / (RATE x seconds) is the share of the run it was busy on the CPU, as a
lower bound: py-spy drops the reads that fail (--nonblocking), and reports how many.
The report groups the busiest thread's samples by the first frame of a known package (starlette/fastapi,
pydantic, uvicorn, vllm's OpenAI layer, vllm's engine client, the course's service...).

    python3 .ci/gpu-profile-layer.py [CONCURRENCY] [REQUESTS] [SHAPE]   # defaults: 64, 1024, the embedded model
SHAPE (e.g. llama-3.1-8b) loads that architecture with random weights (load_format="dummy", models.shape_dir).
Writes to $OUT (default /tmp/out): profile-<arch>.txt (py-spy raw collapsed stacks), profile-layer.json and
profile-layer.md. Needs py-spy (pip install py-spy) and permission to read another process's memory
(root, or ptrace allowed).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from inference_course import bench  # noqa: E402
from inference_course.models import model_label, resolve_model, shape_dir  # noqa: E402
from inference_course.profiles import get_profile  # noqa: E402
from inference_course.servers import service_server, vllm_server  # noqa: E402

RATE = 250
SERVED, TENANT, KEY = "smollm2", "bench", "sk-profile"
# The first matching marker (searched from the innermost frame outwards) names where a sample's time goes.
GROUPS = [
    ("json / orjson", ("json/", "orjson")),
    ("pydantic", ("pydantic",)),
    ("tokenizer / detokenizer", ("tokenizers", "transformers/", "detokenizer", "incremental_detokenizer")),
    ("vllm engine client (AsyncLLM, output processor)", ("vllm/v1/engine/", "vllm/v1/metrics", "vllm/v1/core")),
    ("vllm OpenAI layer (serving_chat, protocol)", ("vllm/entrypoints/",)),
    ("course service (inference_course)", ("inference_course/",)),
    ("prometheus client", ("prometheus_client", "prometheus_fastapi_instrumentator")),
    ("starlette / fastapi", ("starlette/", "fastapi/", "sse_starlette")),
    ("uvicorn / h11 / httptools", ("uvicorn/", "h11/", "httptools")),
    ("asyncio / selectors", ("asyncio/", "selectors.py", "uvloop")),
    ("zmq / msgspec (engine IPC)", ("zmq/", "msgspec")),
]


def group_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for name, markers in GROUPS:
            if any(m in frame for m in markers):
                return name
    return "other"


def read_raw(path: Path) -> dict[str, collections.Counter]:
    """py-spy --format raw --threads: 'thread (0x..);frame;frame... count' per line -> per-thread stacks."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        root = frames[0].startswith(("thread (", "process "))  # --threads puts 'thread (tid): name' first
        thread = frames[0] if root else "?"
        threads[thread][tuple(frames[1:] if root else frames)] += int(count)
    return threads


def profile(arch: str, server, concurrency: int, requests: int, out: Path, prompts, warm) -> dict:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # warm-up with prompts of their own (the measured ones would then hit the prefix cache): the first
    # requests after a start pay one-off costs
    bench.run(server.url, SERVED, warm, concurrency=concurrency, max_tokens=128, api_key=KEY)
    raw = out / f"profile-{arch}.txt"
    spy = subprocess.Popen([py_spy, "record", "--pid", str(server.pid), "--rate", str(RATE), "--format", "raw",
                            "--threads", "--nonblocking", "--output", str(raw)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)  # py-spy attaches
    if spy.poll() is not None:
        raise SystemExit(f"py-spy could not attach to {arch} (pid {server.pid}):\n{spy.stdout.read()}")
    try:
        t0 = time.perf_counter()
        results, duration = bench.run(server.url, SERVED, prompts, concurrency=concurrency, max_tokens=128,
                                      api_key=KEY)
        seconds = time.perf_counter() - t0
    finally:  # py-spy writes its samples when interrupted; never leave it attached
        spy.send_signal(signal.SIGINT)
        try:
            log = spy.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            spy.kill()
            raise
    summary = bench.summarize(results, duration)
    counted = re.search(r"Samples: (\d+) Errors: (\d+)", log)  # py-spy's own tally of reads and failed reads
    sampled, failed = (int(counted.group(1)), int(counted.group(2))) if counted else (None, None)
    threads = read_raw(raw)
    busiest = max(threads, key=lambda t: sum(threads[t].values()))
    samples = sum(threads[busiest].values())
    groups = collections.Counter()
    leaves = collections.Counter()
    for frames, count in threads[busiest].items():
        groups[group_of(list(frames))] += count
        leaves[frames[-1] if frames else "?"] += count
    # py-spy ran from 2 s before the load to its end: count the busy share over the load's seconds only
    # (the idle 2 s add no samples, the thread being idle)
    return {
        "arch": arch, "pid": server.pid, "concurrency": concurrency, "requests": requests,
        "load_seconds": round(seconds, 2),
        "output_throughput": round(summary["output_throughput"], 1),
        "median_ttft_ms": round(summary["median_ttft_ms"], 1),
        "threads": {t: sum(c.values()) for t, c in sorted(threads.items(), key=lambda kv: -sum(kv[1].values()))},
        "busiest_thread": busiest,
        # A lower bound: with --nonblocking py-spy drops the reads that fail (py_spy_errors), and those
        # may well fall while the thread is busy; the share cannot say whether the thread was saturated.
        "busiest_busy_share": round(samples / (RATE * seconds), 3),
        "py_spy_samples": sampled, "py_spy_errors": failed,
        "groups": {g: round(c / samples, 3) for g, c in groups.most_common()},
        "top_leaves": [(leaf, round(c / samples, 3)) for leaf, c in leaves.most_common(15)],
        "py_spy_log_tail": log[-600:],
    }


def main() -> None:
    concurrency = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    shape = sys.argv[3] if len(sys.argv) > 3 else None
    out = Path(os.environ.get("OUT", "/tmp/out")) / (shape or "embedded")
    out.mkdir(parents=True, exist_ok=True)
    P = get_profile()
    model = str(shape_dir(shape)) if shape else resolve_model()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = bench.random_text_prompts(tokenizer, requests, P.input_len, seed=7)
    warm = bench.random_text_prompts(tokenizer, 2 * concurrency, P.input_len, seed=8)
    engine = P.serving_engine_kwargs()
    if shape:
        engine["load_format"] = "dummy"
    reports = []
    for arch in ("native", "service"):
        if arch == "native":
            server = vllm_server(model, served_name=SERVED, **engine)
        else:
            server = service_server(model, keys={TENANT: KEY}, served_name=SERVED, max_in_flight=2 * concurrency,
                                    rate_limit=None, **engine)
        with server:  # started and ready inside the block, stopped at its end
            reports.append(profile(arch, server, concurrency, requests, out, prompts, warm))
        print(json.dumps({k: v for k, v in reports[-1].items() if k != "py_spy_log_tail"}, indent=1), flush=True)
    (out / "profile-layer.json").write_text(json.dumps(reports, indent=1))
    lines = [f"# {model_label(model)}{' (random weights)' if shape else ''}: front-end process profiles at "
             f"concurrency {concurrency}, {requests} requests "
             f"({P.input_len} in / 128 out), {P.name} profile, py-spy at {RATE} Hz", ""]
    for r in reports:
        lines += [f"## {r['arch']}: {r['output_throughput']:,.0f} output tok/s, median TTFT {r['median_ttft_ms']} ms, "
                  f"busiest thread busy at least {r['busiest_busy_share']:.0%} of {r['load_seconds']} s "
                  f"(py-spy: {r['py_spy_samples']} samples, {r['py_spy_errors']} failed reads)",
                  "", "| where | share of the busiest thread's samples |", "|---|---|"]
        lines += [f"| {g} | {s:.1%} |" for g, s in r["groups"].items()]
        lines += ["", "top leaf frames: " + "; ".join(f"{leaf} {s:.1%}" for leaf, s in r["top_leaves"][:8]), ""]
    (out / "profile-layer.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
