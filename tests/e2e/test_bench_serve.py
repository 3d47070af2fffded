"""The load driver (`ferry bench serve`) against a real sim-executor cluster, through
the SDK and through HTTP: every request completes, counted in its priority class."""

from __future__ import annotations

import argparse
import asyncio
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
        "--executor", "sim", "--sim-profile", str(REPO / "services/worker/profiles/tiny-cpu.json")))
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
            assert result["mode"] == "trace" and result["request_throughput"] > 0
            assert result["total_input_tokens"] == sum(r["prompt_tokens"] for r in rows)
            assert result["total_output_tokens"] == sum(r["output_tokens"] for r in rows)
            # each request's own times, in arrival order, after the replay began
            requests = result["requests"]
            assert requests["columns"][:2] == ["trace_index", "priority"]
            got = [dict(zip(requests["columns"], row, strict=True)) for row in requests["rows"]]
            assert [g["trace_index"] for g in got] == list(range(12))
            assert all(0 <= g["arrival_s"] < g["first_token_s"] <= g["finish_s"]
                       and g["error"] is None for g in got)
            assert [g["output_tokens"] for g in got] == [r["output_tokens"] for r in rows]
        # Closed loop, 3 in flight, a trace with no high-priority request: its statistics
        # are null (never NaN: a strict parser reads the file).
        normal = tmp_path / "normal.jsonl"
        normal.write_text("".join(json.dumps({**r, "priority": "normal"}) + "\n" for r in rows))
        args = argparse.Namespace(
            trace=str(normal), sdk_addr=cluster.sdk_addr, http="", admin_addr=cluster.admin_addr,
            vocab_size=1000, time_scale=1.0, max_output_tokens=0, max_prompt_tokens=0,
            timeout=60.0, seed=0, out=str(tmp_path / "closed.json"), label="c",
            no_progress=True, concurrency=3)
        result = serve.run(args)
        assert result["num_requests"] == 12 and result["num_failed"] == 0, result["errors"]
        assert result["mode"] == "closed_loop" and result["concurrency"] == 3
        for key in ("request_throughput", "input_throughput", "output_throughput"):
            assert result[key] > 0
        assert result["output_throughput"] == pytest.approx(
            result["total_output_tokens"] / result["duration_s"])
        written = json.loads((tmp_path / "closed.json").read_text(),
                             parse_constant=_refuse_constant)
        assert written["by_priority"]["high"]["e2e_latency_s"] == {
            "mean": None, "p50": None, "p99": None}
        assert "req/s" in serve.table(result)
    finally:
        cluster.stop()


def _refuse_constant(name: str):
    raise ValueError(f"{name} in the results JSON")


def test_replays_sessions_and_shared_prefixes(tmp_path):
    """A trace with a shared prefix and multi-turn sessions (bench/workload.py): a later turn
    is sent after the one before it, its prompt that turn's prompt and output plus its own
    message, and the workers' prefix caches see the shared tokens."""
    trace = tmp_path / "sessions.jsonl"
    rows = []
    for s in range(3):
        for turn in range(3):
            rows.append({"arrival_s": s * 0.05, "prompt_tokens": 6, "output_tokens": 4,
                         "priority": "normal", "session_id": f"s{s}", "turn": turn,
                         "think_s": 0.02, "prefix_id": "system", "prefix_tokens": 48})
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cluster = start_cluster(tmp_path, workers=1, extra=(
        "--executor", "sim", "--sim-profile", str(REPO / "services/worker/profiles/tiny-cpu.json")))
    try:
        args = argparse.Namespace(
            trace=str(trace), sdk_addr=cluster.sdk_addr, http="", admin_addr=cluster.admin_addr,
            vocab_size=1000, time_scale=1.0, max_output_tokens=0, max_prompt_tokens=0,
            timeout=60.0, seed=0, out="", label="s", no_progress=True)
        records = asyncio.run(serve.replay(args))
        assert len(records) == 9 and not [r.error for r in records if r.error]
        by_index = {int(r.req_id): r for r in records}
        for s in range(3):
            turns = [by_index[3 * s + t] for t in range(3)]
            # 48 + 6, then + 4 generated + 6 new, then again
            assert [r.num_prompt_tokens for r in turns] == [54, 64, 74]
            for earlier, later in zip(turns, turns[1:], strict=False):
                assert later.arrival_s >= earlier.finish_s + 0.02
        result = serve.run(argparse.Namespace(**{**vars(args), "no_progress": True}))
        # run twice: the second run's prompts are all cached but each one's last block
        assert result["num_failed"] == 0 and result["cache_hit_rate"] > 0.5, result
        with pytest.raises(SystemExit, match="sessions"):
            asyncio.run(serve.replay(argparse.Namespace(**{**vars(args), "http": "http://x"})))
    finally:
        cluster.stop()
