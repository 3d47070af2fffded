"""experiments/request_compare.py: the real and simulated runs request by request."""

from __future__ import annotations

import pytest

from experiments import request_compare
from ferry.bench.metrics import REQUEST_COLUMNS


def rows(*requests) -> dict:
    return {"columns": list(REQUEST_COLUMNS), "rows": [list(r) for r in requests]}


def test_offsets_way_out_and_drift_per_request():
    # (trace_index, priority, prompt, output, arrival, first token, finish, error)
    real = rows((0, "normal", 10, 5, 0.0, 0.030, 1.0, None),
                (1, "normal", 10, 5, 1.5, 1.540, 2.0, None),  # a later turn: sent late
                (2, "normal", 10, 5, 2.0, None, None, "boom"))
    sim = rows((0, "normal", 10, 5, 0.0, 0.020, 0.9, None),
               (1, "normal", 10, 5, 1.4, 1.420, 1.9, None),
               (2, "normal", 10, 5, 2.0, 2.010, 2.5, None))
    start_unix = 100.0
    step_ends = [100.025, 101.535, 101.9]  # the first tokens left 5 ms after their steps
    got = request_compare.compare({"requests": real, "start_unix": start_unix}, sim, step_ends)
    assert got["requests"] == 2  # the failed request has no TTFT
    assert got["ttft_real_minus_sim_s"]["p50"] == pytest.approx(0.015)  # 10 and 20 ms
    assert got["way_out_s"]["p50"] == pytest.approx(0.005)
    assert got["arrival_drift_s"]["p90"] == pytest.approx(0.1)
    assert got["arrival_drift_last_third_s"]["n"] == 1
    assert [s["trace_index"] for s in got["slowest"]] == [1, 0]
    table = request_compare.format_table({"x": got | {"rate": 1.0}})
    assert "| x | 1.00 | 2 | 10.0 / 15.0 / 20.0 | 5.0 / 5.0 |" in table


def test_p99_interval_is_wide_when_one_request_decides_it():
    steady = rows(*[(i, "normal", 10, 5, float(i), i + 0.1, i + 1.0, None) for i in range(100)])
    low, high = request_compare.p99_interval(steady)
    assert low == high == pytest.approx(0.1)  # every TTFT 0.1 s: nothing to resample
    one_slow = [(i, "normal", 10, 5, float(i), i + (5.0 if i == 7 else 0.1), i + 9.0, None)
                for i in range(100)]
    low, high = request_compare.p99_interval(rows(*one_slow))
    assert low == pytest.approx(0.1) and high > 4.0  # in or out of the resample: 0.1 or ~5 s
    assert request_compare.p99_interval(rows(*one_slow[:10])) is None
