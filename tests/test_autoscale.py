"""inference_course.autoscale against the worked examples of the Kubernetes and KEDA documentation."""
from __future__ import annotations

import math

import pytest

from inference_course.autoscale import Stabilizer, hpa_desired, keda_desired


def test_hpa_documented_examples():
    # "if the current metric value is 200m, and the desired value is 100m, the number of replicas will be
    # doubled ... If the current value is instead 50m, you'll halve the number of replicas"
    assert hpa_desired(4, 0.200, 0.100) == 8
    assert hpa_desired(4, 0.050, 0.100) == 2
    # rounded up: 3 replicas at 1.5x the target -> ceil(4.5) = 5
    assert hpa_desired(3, 7.5, 5) == 5


def test_hpa_tolerance_keeps_the_count():
    assert hpa_desired(3, 5.4, 5) == 3  # ratio 1.08, inside the default 0.1
    assert hpa_desired(3, 4.6, 5) == 3  # ratio 0.92
    assert hpa_desired(3, 5.6, 5) == 4  # ratio 1.12: ceil(3.36)
    assert hpa_desired(3, 5.4, 5, tolerance=0.0) == 4


def test_hpa_clamps_and_rejects_nonsense():
    assert hpa_desired(2, 100, 5, max_replicas=4) == 4
    assert hpa_desired(2, 0, 5, min_replicas=1) == 1
    assert hpa_desired(2, math.nan, 5) == 2  # a missing metric changes nothing
    with pytest.raises(ValueError, match="KEDA activates"):
        hpa_desired(0, 3, 5)
    with pytest.raises(ValueError, match="positive"):
        hpa_desired(1, 3, 0)


def test_keda_activates_from_zero_and_divides_the_total():
    assert keda_desired(0, 0.0, 5) == 0  # not above the activation threshold: stays at 0
    assert keda_desired(0, 3.0, 5, activation=4) == 0
    assert keda_desired(0, 3.0, 5) == 1  # activated: at least one replica
    assert keda_desired(0, 12.0, 5) == 3
    assert keda_desired(2, 12.0, 5) == 3  # 6 per replica against 5: ceil(2 * 1.2)
    assert keda_desired(2, 0.0, 5) == 0  # deactivated (the caller waits for the cooldown)
    assert keda_desired(2, 0.0, 5, min_replicas=1) == 1
    assert keda_desired(1, 50.0, 5, max_replicas=3) == 3


def test_stabilizer_scales_up_at_once_and_down_after_the_window():
    s = Stabilizer(scale_down_window_s=10)
    assert s(0, 1, 3) == 3  # up: at once
    assert s(3, 3, 1) == 3  # down asked at t=3, but 3 was recommended within the last 10 s
    assert s(9, 3, 1) == 3
    assert s(11, 3, 1) == 1  # the recommendation of 3 (t=0) left the window
    assert s(12, 1, 1) == 1


def test_stabilizer_steps_down_to_the_highest_recent_recommendation():
    s = Stabilizer(scale_down_window_s=10)
    s(0, 1, 4)
    s(5, 4, 2)
    assert s(12, 4, 1) == 2  # 4 left the window; 2 (t=5) is the highest still in it
    assert s(16, 2, 1) == 1
