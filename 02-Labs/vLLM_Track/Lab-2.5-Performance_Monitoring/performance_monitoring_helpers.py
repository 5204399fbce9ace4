"""Helpers for Lab 2.5 (Performance Monitoring): reading Prometheus text pages and histograms.

The servers (vLLM, the course's service, Prometheus, Alertmanager), the Prometheus queries, the webhook
receiver and the OTLP span sink come from the package (``inference_course.servers`` and
``inference_course.monitoring``); this module holds what the lab's notebooks do with the numbers:

* ``scrape``, ``metric`` (from the package): one ``/metrics`` page as {sample: [(labels, value)]}, and a sum;
* ``families``/``inventory``: what a ``/metrics`` page exports (name, type, labels, series, buckets);
* ``histogram``/``histogram_delta``: one histogram's cumulative buckets, and what a workload added to them;
* ``bucket_quantile``: the quantile estimate Prometheus' ``histogram_quantile`` computes from buckets
  (linear interpolation inside the bucket that holds the rank); ``bucket_bounds``: the bucket it lies in,
  i.e. how far off the estimate can be;
* ``GPU_JOB``, ``compare_with_nvidia_smi``: the scrape job of the GPU exporter (``inference_course.gpu_metrics``,
  dcgm-exporter's names), and its reading set beside ``nvidia-smi``'s, with a verdict per quantity.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from inference_course.monitoring import metric, scrape  # noqa: F401  (H.scrape, H.metric in the notebooks)


def families(text: str) -> list[dict]:
    """Every metric family of a Prometheus text page: name, type, help, label names (without ``le``),
    number of series, and for histograms the bucket upper bounds (``+Inf`` included)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        labels = sorted({k for s in family.samples for k in s.labels if k not in ("le", "quantile")})
        series = {tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("le", "quantile")))
                  for s in family.samples}
        bounds = sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})
        out.append({"name": family.name, "type": family.type, "help": family.documentation,
                    "labels": labels, "series": len(series), "buckets": bounds})
    return out


def inventory(text: str):
    """``families`` as a pandas DataFrame, one row per family, sorted by name."""
    import pandas as pd

    df = pd.DataFrame(families(text))
    df["n_buckets"] = df.buckets.map(len)
    return df.sort_values("name").reset_index(drop=True)


def histogram(samples: dict, name: str, **labels) -> list[tuple[float, float]]:
    """The cumulative buckets ``[(le, count), ...]`` of histogram ``name`` (without ``_bucket``), summed
    over the series whose labels include ``labels``, sorted by ``le`` (``+Inf`` last)."""
    totals: dict[float, float] = {}
    for have, value in samples.get(name + "_bucket", []):
        if all(have.get(k) == str(v) for k, v in labels.items()):
            le = float(have["le"])
            totals[le] = totals.get(le, 0.0) + value
    if not totals:
        raise KeyError(f"no histogram {name!r} with labels {labels} on this page "
                       f"(histograms there: {sorted(n[:-7] for n in samples if n.endswith('_bucket'))})")
    return sorted(totals.items())


def histogram_delta(before: dict, after: dict, name: str, **labels) -> list[tuple[float, float]]:
    """What happened between two scrapes: the buckets of ``after`` minus those of ``before``."""
    try:
        old = dict(histogram(before, name, **labels))
    except KeyError:  # the series did not exist yet at the first scrape: it started from 0
        old = {}
    return [(le, count - old.get(le, 0.0)) for le, count in histogram(after, name, **labels)]


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile(q, ...)`` on cumulative buckets ``[(le, count), ...]`` ending at
    ``+Inf``: find the bucket where the rank ``q × total`` falls and interpolate linearly inside it (from 0
    for the first bucket). A rank in the ``+Inf`` bucket gives the largest finite bound; no observations
    give NaN. (The rules of promql/quantile.go, Prometheus 2.x, for well-formed buckets: Prometheus also repairs
    counts that decrease from one bucket to the next, which scrapes of one consistent page never produce.)"""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    for i, (le, count) in enumerate(buckets):
        if count >= rank:
            break
    if i == len(buckets) - 1:
        return buckets[-2][0]
    if i == 0 and le <= 0:
        return le
    start, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
    inside = count - below
    if inside == 0:  # rank 0 in an empty bucket (q = 0): Prometheus computes 0/0, NaN
        return math.nan
    return start + (le - start) * ((rank - below) / inside)


def bucket_bounds(q: float, buckets: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(lower, upper) edge of the bucket that holds the ``q`` quantile's rank: the true quantile lies
    there, whatever ``bucket_quantile`` interpolated. ``(last finite bound, inf)`` in the ``+Inf`` bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return (math.nan, math.nan)  # no observations: no bucket holds anything
    rank = q * buckets[-1][1]
    for i, (le, count) in enumerate(buckets):
        if count >= rank:
            return (0.0 if i == 0 else buckets[i - 1][0], le)
    return (buckets[-2][0], math.inf)


GPU_JOB = "gpu-metrics"  # the Prometheus job of the GPU exporter (dcgm-exporter in production)
# How far the exporter may be from nvidia-smi's readings taken just before and just after its scrape. Memory
# used is a level: 1% of the GPU's memory. Utilization and power are averages over the driver's sample period,
# read at slightly different moments: 20 percentage points, and the larger of 10% and 10 W.
MEMORY_TOLERANCE = 0.01
UTILIZATION_TOLERANCE = 20.0
POWER_TOLERANCE = (0.10, 10.0)


def compare_with_nvidia_smi(samples: dict, smi_before: list[dict], smi_after: list[dict]):
    """The exporter's page (``scrape``: {name: [(labels, value)]}) beside two nvidia-smi readings taken just
    before and after it (``gpu_metrics.nvidia_smi()``), one row per GPU and quantity: the exporter's value,
    nvidia-smi's range, the tolerance and whether the exporter lies within the range widened by it."""
    import pandas as pd

    names = {"memory used (MiB)": ("DCGM_FI_DEV_FB_USED", "memory.used"),
             "utilization (%)": ("DCGM_FI_DEV_GPU_UTIL", "utilization.gpu"),
             "power (W)": ("DCGM_FI_DEV_POWER_USAGE", "power.draw")}
    rows = []
    for before, after in zip(smi_before, smi_after):
        uuid = before["uuid"]
        for quantity, (metric_name, field) in names.items():
            mine = [v for labels, v in samples.get(metric_name, []) if labels.get("UUID") == uuid]
            low, high = sorted((before[field], after[field]))
            tolerance = {"memory used (MiB)": MEMORY_TOLERANCE * before["memory.total"],
                         "utilization (%)": UTILIZATION_TOLERANCE,
                         "power (W)": max(POWER_TOLERANCE[0] * high, POWER_TOLERANCE[1])}[quantity]
            value = mine[0] if len(mine) == 1 else math.nan
            rows.append({"gpu": int(before["index"]), "quantity": quantity, "exporter": value,
                         "nvidia-smi before": before[field], "nvidia-smi after": after[field],
                         "tolerance": tolerance, "agrees": bool(low - tolerance <= value <= high + tolerance)})
    return pd.DataFrame(rows)
