"""Is a decode step memory-bandwidth bound? Measure, then compare one token's time with one weight read.

Every decode step of a dense model reads all its weights once. At batch 1 a token therefore takes at least
``weight_bytes / bandwidth``; how far above that floor a measured token time lies says where the time goes.
The bandwidth is measured on the same run (a device-to-device copy, :func:`copy_bandwidth`), not taken from
a datasheet, so the check holds on a laptop CPU as on an H200::

    from inference_course.bandwidth import copy_bandwidth, weight_read_check
    bw = copy_bandwidth("cuda")                        # bytes moved (read + written) per second
    check = weight_read_check(weight_bytes, 1 / tok_per_s_at_batch_1, bw, "vLLM, batch 1")
    print(check["text"])                               # the numbers and the verdict, computed

A copy reads and writes, and a matrix-vector kernel only reads, so an engine can stream its weights
somewhat faster than the copy rate: the weight-read time computed here is an estimate, close to but
above the true floor. The verdict's bands are wide for that reason.
"""
from __future__ import annotations

import time

# Ratios of (one token's time) / (one weight read at the measured bandwidth) that separate the verdicts.
BOUND_MAX = 2.0      # up to here the weight read is at least half of the token's time
OVERHEAD_MIN = 10.0  # from here the weight read is under a tenth of it


def weight_bytes(config: dict, dtype: str) -> int:
    """Bytes of a Llama/Qwen2-style decoder's weights in ``dtype`` (as the engine's ``dtype`` argument names
    it), from its config: what one decode step reads (the embedding table, when tied, is also the LM head)."""
    from inference_course.models import dtype_bytes, parameter_count

    return parameter_count(config) * dtype_bytes(dtype)


def copy_bandwidth(device: str = "cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes moved per second (each copied byte counted twice: read once, written once) by the best of
    ``repeats`` copies of a ``nbytes`` buffer on ``device`` ("cpu" or "cuda[:N]"), measured with torch.
    The buffer (256 MiB by default) is larger than the caches of CPUs and GPUs (an H200 has 60 MiB of L2), so the copy
    runs from main memory (RAM or HBM)."""
    import torch

    on_gpu = str(device).startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"copy_bandwidth({device!r}): torch sees no CUDA device here; measure on 'cpu'")
    nbytes = nbytes or (256 << 20)
    if nbytes <= 0 or repeats < 1:
        raise ValueError(f"copy_bandwidth needs nbytes > 0 and repeats >= 1, got {nbytes} and {repeats}")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    try:
        dst.copy_(src)  # first touch: page faults on CPU, lazy allocation on GPU
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            sync()
            best = min(best, time.perf_counter() - t0)
    finally:
        del src, dst
        if on_gpu:
            torch.cuda.empty_cache()
    return 2 * nbytes / best


def weight_read_check(weight_bytes: float, seconds_per_token: float, bandwidth: float, label: str) -> dict:
    """Compare one token's measured time with one read of the weights at ``bandwidth`` (bytes/s, from
    :func:`copy_bandwidth`). Returns the numbers, ``ratio`` (token time / weight-read time), ``verdict``
    (one of "faster than the copy rate", "bandwidth-bound", "in between", "overhead-bound") and ``text``:
    printable lines with the numbers and what they mean."""
    if weight_bytes <= 0 or seconds_per_token <= 0 or bandwidth <= 0:
        raise ValueError(f"weight_read_check needs positive numbers, got weight_bytes={weight_bytes}, "
                         f"seconds_per_token={seconds_per_token}, bandwidth={bandwidth}")
    read_s = weight_bytes / bandwidth
    ratio = seconds_per_token / read_s
    head = (f"{label}: one token took {seconds_per_token * 1e3:.3g} ms; reading the weights once "
            f"({weight_bytes / 2**30:.3g} GiB) at this run's measured copy rate ({bandwidth / 1e9:,.1f} GB/s) "
            f"takes {read_s * 1e3:.3g} ms: the token took {ratio:.2f}x one weight read")
    share = 1 / ratio  # the weight read's share of one token's time
    smaller = ("weights stored in fewer bytes (quantization) would make it faster, if the kernels read them in "
               "that small form (a kernel that widens them back to 16 bit first reads as many bytes as before)")
    if ratio < 1:
        verdict = "faster than the copy rate"
        why = ("faster than one weight read at the copy rate: the engine streams its weights faster than a copy "
               "(a copy also writes; caches can hold part of a small model), so this step runs as fast as memory "
               f"allows: memory-bandwidth bound; {smaller}")
    elif ratio <= BOUND_MAX:
        verdict = "bandwidth-bound"
        why = (f"within {BOUND_MAX:g}x of one weight read: reading the weights is {share:.0%} of each step, so the "
               f"step is memory-bandwidth bound; {smaller}")
    elif ratio < OVERHEAD_MIN:
        verdict = "in between"
        why = (f"between {BOUND_MAX:g}x and {OVERHEAD_MIN:g}x one weight read: reading the weights is {share:.0%} of "
               f"each step and the other {1 - share:.0%} goes elsewhere (per-step overhead: scheduling, kernel "
               f"launches, Python; or compute); smaller weights could shorten at most that {share:.0%}")
    else:
        verdict = "overhead-bound"
        why = (f"over {OVERHEAD_MIN:g}x one weight read: reading the weights is {share:.1%} of each step, so the "
               "step is not memory-bandwidth bound but bound by per-step overhead (scheduling, kernel launches, "
               "Python) or compute; smaller weights would barely change it")
    return {"label": label, "weight_bytes": weight_bytes, "seconds_per_token": seconds_per_token,
            "bandwidth": bandwidth, "read_s": read_s, "ratio": ratio, "verdict": verdict,
            "text": f"{head}\n  verdict: {why}"}
