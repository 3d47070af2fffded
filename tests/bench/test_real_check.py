"""experiments.real_check: a slowed-down real run's latencies come back on the trace's clock."""

from __future__ import annotations

from experiments.real_check import in_trace_time


def test_slow_motion_latencies_are_divided_back_and_nothing_else_is():
    stats = {"mean": 3.0, "p50": 1.5, "p99": 6.0}
    result = {"prefill_latency_s": stats, "decode_latency_s": stats, "e2e_latency_s": stats,
              "num_requests": 10, "num_migrations": 4,
              "by_priority": {"high": {"prefill_latency_s": {"mean": None, "p50": None,
                                                             "p99": None},
                                       "decode_latency_s": stats, "e2e_latency_s": stats}}}
    out = in_trace_time(result, 3.0)
    assert out["prefill_latency_s"] == {"mean": 1.0, "p50": 0.5, "p99": 2.0}
    assert out["num_requests"] == 10 and out["num_migrations"] == 4
    assert out["by_priority"]["high"]["prefill_latency_s"]["p99"] is None  # no requests
    assert out["by_priority"]["high"]["e2e_latency_s"]["p99"] == 2.0
    assert result["prefill_latency_s"]["p99"] == 6.0  # the input is left as it was
    assert in_trace_time(result, 1.0) is result
