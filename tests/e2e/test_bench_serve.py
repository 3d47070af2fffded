"""The load driver (`ferry bench serve`) against a real sim-executor cluster, through
the SDK and through HTTP: every request completes, counted in its priority class."""

from __future__ import annotations

import argparse
import json

import pytest

from ferry.bench import serve
from ferry.bench.local_cluster import REPO, start_cluster

pytestmark = pytest.mark.e2e


def test_replays_a_trace_through_sdk_and_http(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [{"arrival_s": i * 0.05, "prompt_tokens": 8 + i, "output_tokens": 5 + i,
             "priority": "high" if i % 4 == 0 else "normal"} for i in range(12)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cluster = start_cluster(tmp_path, workers=2, extra=(
        "--executor", "sim", "--sim-profile", str(REPO / "bench/profiles/tiny-cpu.json")))
    try:
        for http in ("", cluster.base_url + "/v1"):
            args = argparse.Namespace(
                trace=str(trace), sdk_addr=cluster.sdk_addr, http=http,
                admin_addr=cluster.admin_addr, vocab_size=1000, time_scale=1.0,
                max_output_tokens=0, max_prompt_tokens=0, timeout=60.0, seed=0,
                out=str(tmp_path / f"result{'-http' if http else ''}.json"), label="t",
                no_progress=True)
            result = serve.run(args)
            assert result["num_requests"] == 12 and result["num_failed"] == 0, result["errors"]
            assert result["by_priority"]["high"]["num_requests"] == 3
            assert result["prefill_latency_s"]["p50"] > 0
            assert (tmp_path / f"result{'-http' if http else ''}.png").is_file()
    finally:
        cluster.stop()
