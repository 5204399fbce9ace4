"""The replica counts a Kubernetes HorizontalPodAutoscaler and a KEDA ScaledObject would ask for.

No Kubernetes controller runs on the course's machines, so the labs apply the controllers' documented
arithmetic to real metrics (Prometheus queries of running engines) and start or stop real replicas with
the result. The formulas follow the documentation of the versions the course's chart targets:

- HPA (``autoscaling/v2``), https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/
  ("Algorithm details"): ``desired = ceil(current * metric / target)``; no change while
  ``|metric / target - 1|`` is within the tolerance (0.1 by default, the controller's
  ``--horizontal-pod-autoscaler-tolerance``); clamped to ``[minReplicas, maxReplicas]``. For a ``Pods``
  metric with an ``AverageValue`` target, ``metric`` is the average over the pods.
- ``behavior`` ("Stabilization window"): the controller remembers its recommendations; it scales up to the
  lowest recommendation of the scale-up window (default 0 s: at once) and down to the highest of the
  scale-down window (default 300 s), so that a short dip does not remove replicas that are needed again.
- KEDA's Prometheus scaler, https://keda.sh/docs/latest/scalers/prometheus/: the query's value is handed
  to an HPA as an ``External`` metric with an ``AverageValue`` target of ``threshold``, so
  ``desired = ceil(value / threshold)``; at 0 replicas KEDA itself activates the workload (0 -> 1) only
  when the value is above ``activationThreshold``, and deactivates it (-> 0) when it is not
  (after ``cooldownPeriod``, which the caller times).
"""
from __future__ import annotations

import math
from collections import deque

HPA_TOLERANCE = 0.1  # kube-controller-manager --horizontal-pod-autoscaler-tolerance default


def _clamp(n: int, min_replicas: int, max_replicas: int | None) -> int:
    if max_replicas is not None:
        n = min(n, max_replicas)
    return max(n, min_replicas)


def hpa_desired(current: int, metric: float, target: float, *, tolerance: float = HPA_TOLERANCE,
                min_replicas: int = 1, max_replicas: int | None = None) -> int:
    """The HPA's replica count for one metric: ``ceil(current * metric / target)``, or ``current`` while the
    ratio ``metric / target`` is within ``tolerance`` of 1, clamped to ``[min_replicas, max_replicas]``.

    ``metric`` is what the HPA compares with the target: for ``Pods``/``AverageValue`` (the chart's queue
    metric) the average over the current pods, for ``Utilization`` the average percentage."""
    if current < 1:
        raise ValueError(f"the HPA scales a workload that has replicas; current={current} (KEDA activates from 0)")
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    if math.isnan(metric):
        return _clamp(current, min_replicas, max_replicas)  # no data: the HPA does not act on a missing metric
    ratio = metric / target
    if abs(ratio - 1.0) <= tolerance:
        return _clamp(current, min_replicas, max_replicas)
    return _clamp(math.ceil(current * ratio), min_replicas, max_replicas)


def keda_desired(current: int, value: float, threshold: float, *, activation: float = 0.0,
                 min_replicas: int = 0, max_replicas: int | None = None,
                 tolerance: float = HPA_TOLERANCE) -> int:
    """KEDA's replica count for a Prometheus trigger whose query returns ``value`` (a total, e.g. the sum of
    the waiting requests over all replicas): 0 while the value is not above ``activation`` and
    ``min_replicas`` is 0; otherwise the HPA's answer for an ``AverageValue`` target of ``threshold``
    (``ceil(value / threshold)``, with its tolerance), at least 1."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if math.isnan(value):
        return _clamp(current, min_replicas, max_replicas)
    if value <= activation and min_replicas == 0:
        return 0
    if current == 0:  # KEDA activates to one replica; the HPA takes over from there
        return _clamp(max(1, math.ceil(value / threshold)), max(1, min_replicas), max_replicas)
    per_pod = value / current
    return _clamp(hpa_desired(current, per_pod, threshold, tolerance=tolerance, min_replicas=1,
                              max_replicas=max_replicas), max(1, min_replicas), max_replicas)


class Stabilizer:
    """The HPA's ``behavior`` stabilization: feed it each raw recommendation with its time; it answers the
    replica count the controller would set. Scale up to the lowest recommendation within
    ``scale_up_window_s`` (0: the newest), scale down to the highest within ``scale_down_window_s``."""

    def __init__(self, scale_down_window_s: float = 300.0, scale_up_window_s: float = 0.0):
        self.scale_down_window_s = scale_down_window_s
        self.scale_up_window_s = scale_up_window_s
        self._history: deque[tuple[float, int]] = deque()

    def __call__(self, t: float, current: int, recommendation: int) -> int:
        self._history.append((t, recommendation))
        keep = max(self.scale_down_window_s, self.scale_up_window_s)
        while self._history and self._history[0][0] < t - keep:
            self._history.popleft()
        up = min(r for s, r in self._history if s >= t - self.scale_up_window_s)
        down = max(r for s, r in self._history if s >= t - self.scale_down_window_s)
        if current < up:
            return up
        if current > down:
            return down
        return current
