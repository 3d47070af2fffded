"""Results of a serving run: throughput, and JSON a strict parser reads."""

from __future__ import annotations

import json

import pytest

from ferry.bench.metrics import RequestRecord, json_safe, request_rows, summarize, throughput
from ferry.bench.serve import table


def _refuse(name: str):
    raise ValueError(f"{name} in JSON")


def _record(i: int, *, start: float, end: float, prompt: int = 10, out: int = 5,
            error: str | None = None) -> RequestRecord:
    return RequestRecord(req_id=str(i), priority="normal", arrival_s=start,
                         num_prompt_tokens=prompt, first_token_s=start + 0.1, finish_s=end,
                         num_output_tokens=out, error=error)


def test_throughput_counts_completed_work_over_the_run():
    records = [_record(0, start=1.0, end=2.0), _record(1, start=1.5, end=3.0, prompt=20, out=7),
               _record(2, start=2.0, end=2.5, error="boom")]
    got = throughput(records)
    assert got["duration_s"] == pytest.approx(2.0) and got["completed"] == 2
    assert (got["total_input_tokens"], got["total_output_tokens"]) == (30, 12)
    assert got["request_throughput"] == pytest.approx(1.0)
    assert got["input_throughput"] == pytest.approx(15.0)
    assert got["output_throughput"] == pytest.approx(6.0)
    empty = throughput([])
    assert empty["request_throughput"] is None and empty["duration_s"] is None


def test_results_json_never_holds_nan():
    records = [_record(0, start=1.0, end=2.0)]  # no high-priority request: empty stats
    result = summarize(records, num_migrations=0, num_preemptions=0, instance_seconds=1.0,
                       extra={"concurrency": None, "mode": "trace", **throughput([]),
                              "weird": [float("inf"), (float("-inf"),)]})
    with pytest.raises(ValueError):
        json.dumps(result, allow_nan=False)
    safe = json_safe(result)
    parsed = json.loads(json.dumps(safe, allow_nan=False), parse_constant=_refuse)
    assert parsed["by_priority"]["high"]["prefill_latency_s"]["p99"] is None
    assert parsed["weird"] == [None, [None]]
    assert parsed["by_priority"]["normal"]["num_requests"] == 1
    assert any(line.startswith("throughput req/s") and line.endswith(" -")
               for line in table(safe).splitlines())


def test_request_rows_keep_each_request_in_arrival_order():
    late = _record(3, start=5.0, end=6.0)
    late.req_id = "r3"  # the simulator's ids
    never = RequestRecord(req_id="7", priority="high", arrival_s=4.0, num_prompt_tokens=9,
                          error="rejected")
    got = request_rows([late, never, _record(1, start=2.5, end=3.0)], origin_s=2.0)
    assert got["columns"][0] == "trace_index"
    assert got["rows"] == [
        [1, "normal", 10, 5, 0.5, pytest.approx(0.6), 1.0, None],
        [7, "high", 9, 0, 2.0, None, None, "rejected"],
        [3, "normal", 10, 5, 3.0, pytest.approx(3.1), 4.0, None]]
