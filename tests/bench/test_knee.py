"""experiments/knee.py: the rate at which P99 TTFT reaches a threshold."""

from __future__ import annotations

import math

import pytest

from experiments.knee import knee_rate


def test_knee_interpolates_log_p99_between_the_rates_around_the_crossing():
    points = [(4.0, 0.5), (2.0, 0.1), (6.0, 8.0)]  # unsorted on purpose
    # log(1/0.5) / log(8/0.5) = 0.25 of the way from 4 to 6
    assert knee_rate(points, 1.0) == pytest.approx(4.5)
    assert knee_rate(points, 0.5) == pytest.approx(4.0)
    assert math.isclose(knee_rate(points, 0.3), 2.0 + 2.0 * math.log(3) / math.log(5))


def test_no_knee_when_never_crossed_or_above_from_the_start():
    assert knee_rate([(1.0, 0.1), (2.0, 0.2)], 1.0) is None
    assert knee_rate([(1.0, 2.0), (2.0, 3.0)], 1.0) is None
    assert knee_rate([], 1.0) is None
