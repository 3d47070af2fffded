"""Results of a serving run, shared by the load driver and the simulator (DESIGN §8):

    {"prefill_latency_s": {"mean","p50","p99"}, "decode_latency_s": {...},
     "e2e_latency_s": {...}, "num_requests", "num_migrations", "num_preemptions",
     "by_priority": {"high": {...}, "normal": {...}}, "instance_seconds"}

prefill latency: arrival -> first output token (queueing included);
decode latency: mean time per output token after the first;
e2e latency: arrival -> last token.

Statistics of an empty set are NaN here; `json_safe` turns them into null before any JSON
is written (JSON has no NaN: strict parsers refuse it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    req_id: str
    priority: str  # "normal" | "high"
    arrival_s: float
    num_prompt_tokens: int
    first_token_s: float | None = None
    finish_s: float | None = None
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def prefill_latency_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def decode_latency_s(self) -> float:
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.num_output_tokens - 1)

    @property
    def e2e_latency_s(self) -> float:
        return self.finish_s - self.arrival_s


def stats(values: Iterable[float]) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p99": float(np.percentile(arr, 99))}


def _latencies(records: list[RequestRecord]) -> dict:
    done = [r for r in records if r.finish_s is not None and r.first_token_s is not None]
    return {
        "prefill_latency_s": stats(r.prefill_latency_s for r in done),
        "decode_latency_s": stats(r.decode_latency_s for r in done if r.num_output_tokens > 1),
        "e2e_latency_s": stats(r.e2e_latency_s for r in done),
        "num_requests": len(done),
    }


def summarize(
    records: list[RequestRecord],
    *,
    num_migrations: int,
    num_preemptions: int,
    instance_seconds: float,
    extra: dict | None = None,
) -> dict:
    result = _latencies(records)
    result.update(
        num_migrations=num_migrations,
        num_preemptions=num_preemptions,
        num_failed=sum(1 for r in records if r.error is not None),
        by_priority={
            name: _latencies([r for r in records if r.priority == name])
            for name in ("high", "normal")
        },
        instance_seconds=instance_seconds,
    )
    if extra:
        result.update(extra)
    return result


def throughput(records: list[RequestRecord]) -> dict[str, float | int | None]:
    """Completed work per second of the run (first request sent -> last one finished):
    requests, prompt tokens and output tokens, as vLLM's benchmark names them."""
    done = [r for r in records if r.finish_s is not None and r.error is None]
    starts = [r.arrival_s for r in records]
    duration = max((r.finish_s for r in done), default=0.0) - min(starts, default=0.0)
    total_in = sum(r.num_prompt_tokens for r in done)
    total_out = sum(r.num_output_tokens for r in done)

    def rate(amount: float) -> float | None:
        return amount / duration if duration > 0 else None

    return {"duration_s": duration if done else None, "completed": len(done),
            "total_input_tokens": total_in, "total_output_tokens": total_out,
            "request_throughput": rate(len(done)), "input_throughput": rate(total_in),
            "output_throughput": rate(total_out)}


REQUEST_COLUMNS = ("trace_index", "priority", "prompt_tokens", "output_tokens",
                   "arrival_s", "first_token_s", "finish_s", "error")


def request_rows(records: Iterable[RequestRecord], *, origin_s: float) -> dict:
    """Each request's own times, for comparing two runs request by request (the load
    driver's against the simulator's): {"columns": REQUEST_COLUMNS, "rows": [...]}, one row
    a request in arrival order, times in seconds after origin_s (None: never reached).
    trace_index is the request's line in the trace (ids "17" and "r17" are both 17)."""
    def since(t: float | None) -> float | None:
        return None if t is None else round(t - origin_s, 6)

    rows = [[int(r.req_id.lstrip("r")), r.priority, r.num_prompt_tokens, r.num_output_tokens,
             since(r.arrival_s), since(r.first_token_s), since(r.finish_s), r.error]
            for r in sorted(records, key=lambda r: r.arrival_s)]
    return {"columns": list(REQUEST_COLUMNS), "rows": rows}


def json_safe(value: Any) -> Any:
    """value with every NaN or infinity (nested in dicts, lists, tuples) made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
