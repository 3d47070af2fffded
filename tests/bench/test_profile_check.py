"""experiments/profile_check.py: one profile against finished sim checks' real results."""

from __future__ import annotations

import json

from experiments import profile_check
from ferry.bench.sim import RequestPath
from ferry.services.worker.latency_model import bundled_profile


def test_each_replay_is_regenerated_and_simulated_with_the_profile(tmp_path):
    real = {"ttft_p50": 0.1, "ttft_p99": 0.2, "decode_p99": 0.01, "e2e_mean": 1.0,
            "preemptions": 0, "req_per_s": 1.0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "sim_check.json").write_text(json.dumps({
        "kv_blocks": 400, "num": 6, "max_num_batched_tokens": 2048,
        "rows": [{"kind": "M-M", "rate": 3.0, "real": real},
                 {"kind": "L-L", "rate": 1.5, "real": real}]}))
    profile = bundled_profile("tiny-cpu")
    rows = profile_check.check_run(run, profile, RequestPath(), 2, tmp_path)
    assert [(r["kind"], r["rate"], r["num"]) for r in rows] == [("M-M", 3.0, 6), ("L-L", 1.5, 6)]
    assert all(r["real"] == real and r["sim"]["seeds"] == 2 and r["sim"]["ttft_p99"] > 0
               for r in rows)
    slower = profile_check.check_run(run, profile, RequestPath(0.05, 0.05), 2, tmp_path)
    assert slower[0]["sim"]["ttft_p50"] > rows[0]["sim"]["ttft_p50"] + 0.09
