"""experiments/cluster_check.py without a GPU: the scheduler log's migrations, their
downtime, the policies' ranking, and a finished run re-analysed (--replayed) from its
workers' step logs."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments import cluster_check


def test_committed_migrations_are_read_from_the_scheduler_log():
    log = "\n".join([
        json.dumps({"event": "migration_committed", "timestamp": "T", "downtime_s": 0.003,
                    "total_s": 0.02, "num_blocks": 64, "src": "worker-0", "dst": "worker-1"}),
        json.dumps({"event": "migration_aborted", "reason": "dst_full"}),
        "not json, but naming \"migration_committed\"",
        json.dumps({"event": "dispatch", "note": "migration_committed"}),
        json.dumps({"event": "migration_committed", "downtime_s": 0.005, "num_blocks": 8}),
    ])
    moved = cluster_check.committed_migrations(log)
    assert [m["downtime_s"] for m in moved] == [0.003, 0.005]
    assert moved[0]["src"] == "worker-0" and moved[1]["dst"] is None


def test_downtime_summary_by_nearest_rank_over_the_moves_with_kv():
    moved = [{"downtime_s": s / 1000, "num_blocks": 4} for s in range(1, 101)]  # 1..100 ms
    waiting = [{"downtime_s": 0.0, "num_blocks": 0}] * 30  # moved before any KV: no pause
    assert cluster_check.downtime_summary(moved + waiting) == {
        "count": 130, "with_kv": 100, "downtime_ms_p50": pytest.approx(50.0),
        "downtime_ms_p99": pytest.approx(99.0)}
    assert cluster_check.downtime_summary(waiting) == {
        "count": 30, "with_kv": 0, "downtime_ms_p50": None, "downtime_ms_p99": None}


def _result(policy, hold, p99s):
    return {"policy": policy, "hold_until_room": hold, "rows": [
        {"kind": "sharegpt", "rate": rate, "real": {"ttft_p99": real},
         "sim_spread": {"ttft_p99": sim}} for rate, (real, sim) in p99s.items()]}


def test_rank_orders_the_policies_real_and_simulated():
    results = [_result("least_load", False, {40.0: (2.0, 2.2), 60.0: (9.0, 7.0)}),
               _result("llumnix", True, {40.0: (1.0, 1.1), 60.0: (8.0, 7.5)})]
    low, high = cluster_check.rank(results)
    assert low["real_order"] == ["llumnix + pending queue", "least_load"]
    assert low["same_order"]
    assert high["real_order"] == ["llumnix + pending queue", "least_load"]
    assert high["sim_order"] == ["least_load", "llumnix + pending queue"]
    assert not high["same_order"]
    assert high["p99"]["least_load"] == {"real": 9.0, "sim": 7.0}
    # a run without spread seeds (a GPU call short of time) ranks by its deterministic run
    bare = _result("round_robin", False, {40.0: (3.0, 0.0)})
    bare["rows"][0] = {"kind": "sharegpt", "rate": 40.0, "real": {"ttft_p99": 3.0},
                       "sim": {"ttft_p99": 0.5}}
    (low,) = cluster_check.rank([bare, results[0]])[:1]
    assert low["sim_order"] == ["round_robin", "least_load"]


def _steps(t0, n):
    return [{"t": t0 + 0.01 * i, "step_s": 0.008, "engine_s": 0.0005, "P": 0, "A": 0,
             "D": 4, "C": 400 + 10 * i} for i in range(n)]


def test_a_finished_run_is_re_analysed_from_its_step_logs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # two workers' logs: 3 warm-up steps each, then the replay's
    for name, t0 in (("steps-worker-0.jsonl", 100.0), ("steps-worker-1.jsonl", 200.0)):
        lines = "\n".join(json.dumps(s) for s in _steps(t0, 60))
        (run / f"{name}.gz").write_bytes(gzip.compress(lines.encode()))
    common = ["--model", "random:tiny", "--workers", "2", "--policy", "llumnix",
              "--kv-blocks", "400", "--kinds", "M-M", "--rates", "2", "--num", "6",
              "--spread-seeds", "2", "--profile", "services/worker/profiles/tiny-cpu.json"]
    real = {"ttft_p50": 0.02, "ttft_p99": 0.05, "decode_p99": 0.01, "e2e_mean": 1.0,
            "preemptions": 0, "req_per_s": 1.9, "cache_hit_rate": 0.0, "migrations": 1}
    (run / "cluster_check.json").write_text(json.dumps({
        "warm_up_steps": {"steps-worker-0.jsonl": 3, "steps-worker-1.jsonl": 3},
        "rows": [{"kind": "M-M", "rate": 2.0, "fraction": 0.1, "real": real,
                  "real_migrations": {"count": 1, "with_kv": 1, "downtime_ms_p50": 3.0,
                                      "downtime_ms_p99": 3.0},
                  "steps": {"steps-worker-0.jsonl": 57, "steps-worker-1.jsonl": 57}}]}))
    out = tmp_path / "out"
    # run(), not main(): main configures logging onto this test's captured stderr
    cluster_check.run(cluster_check.parse([*common, "--replayed", str(run),
                                           "--out-dir", str(out)]))
    result = json.loads((out / "cluster_check.json").read_text())
    assert result["num_steps"] == 114  # both workers, warm-up left out
    (row,) = result["rows"]
    assert row["real"] == real and row["sim_spread"]["seeds"] == 2
    assert row["sim"]["ttft_p99"] > 0 and "migrations" in row["sim"]
    # decode-only steps, linear in context: the pooled cycle fit is close
    assert result["step_error"]["decode"]["median"] < 0.02
    assert "llumnix + pending queue" in capsys.readouterr().out
    # the run's own arguments win over the command line's
    record = json.loads((run / "cluster_check.json").read_text())
    (run / "cluster_check.json").write_text(json.dumps(record | {"policy": "least_load",
                                                                 "hold_until_room": False}))
    cluster_check.run(cluster_check.parse([*common, "--replayed", str(run),
                                           "--out-dir", str(out)]))
    (title,) = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("cluster check:")]
    assert title.endswith("least_load")
    with pytest.raises(SystemExit):  # a run needs its rates
        cluster_check.parse(["--kinds", "M-M"])
