"""The regression guard of the fault handling: `ferry bench chaos`'s harness, short, on a
sim cluster of separate processes (a scheduler, two gateways, three workers) under a
steady load of seeded SDK and HTTP streams. kill -9 of a worker, `ferry drain` and kill -9
of a gateway: every stream of the living gateways completes with exactly the tokens the
sim executor's formula says (no duplicate, no gap, no wrong one), the killed gateway's
clients get a connection error and nothing else, and no KV block is left behind."""

from __future__ import annotations

import asyncio

import pytest

from ferry.bench.chaos import ChaosConfig, run_chaos, table

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_streams_survive_a_killed_worker_a_drain_and_a_killed_gateway(
        tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FERRY_MODEL_CACHE", str(tmp_path_factory.getbasetemp() / "models"))
    cfg = ChaosConfig(phases=("kill_worker", "drain", "kill_gateway"), workers=3,
                      rate_per_s=4.0, max_tokens=120, pool=64, warmup_s=2.0, tail_s=2.0,
                      idle_timeout_s=30.0, stream_wait_s=60.0, log_dir=str(tmp_path / "logs"))
    result = asyncio.run(asyncio.wait_for(run_chaos(cfg), 150))
    report = table(result)
    assert [p["phase"] for p in result["phases"]] == list(cfg.phases)
    for phase in result["phases"]:
        where = f"{phase['phase']}: {phase['problems']}\n{report}\nlogs: {result['log_dir']}"
        assert phase["ok"], where
        assert phase["started"] > 0
        assert phase["duplicate_tokens"] == phase["missing_tokens"] == 0, where
        assert phase["wrong_tokens"] == 0, where
        assert phase["sdk_text_mismatch"] == phase["http_text_mismatch"] == 0, where
        assert phase["cut_short"] == 0 and phase["untyped_errors"] == 0, where
        assert phase["leaked_blocks"] == 0 and phase["idle"], where
        if phase["phase"] != "kill_gateway":
            assert phase["completed"] == phase["started"], where
    kill_worker, drain, kill_gateway = result["phases"]
    assert kill_worker["fault"]["declared_dead_after_s"] < 10
    assert drain["fault"]["drain"]["rc"] == 0
    assert drain["migrations"]["committed"] >= min(1, drain["fault"]["held"])
    # gateway-a's clients did not notice; gateway-b's failed only with connection errors
    by_gateway = kill_gateway["by_gateway"]
    assert by_gateway["gateway-a"]["completed"] == by_gateway["gateway-a"]["started"], report
    assert set(kill_gateway["failed"]) <= {"ConnectionLost", "APIConnectionError",
                                           "RemoteProtocolError"}, report
