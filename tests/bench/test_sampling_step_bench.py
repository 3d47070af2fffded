"""The whole-step sampling bench (bench/sampling_step_bench.py) on the tiny model on CPU:
every case runs real steps through ModelRunner, the grammar case's masks included."""

from __future__ import annotations

import json
import math

from ferry.bench import sampling_step_bench


def test_whole_step_cases_run_and_report(tmp_path, capsys):
    out = tmp_path / "steps.json"
    sampling_step_bench.main(["--model", "tiny", "--device", "cpu", "--batch", "1,3",
                              "--repeats", "2", "--prompt-len", "40", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["batch"], r["case"]) for r in rows] == [
        (b, c) for b in (1, 3) for c in sampling_step_bench.CASES]
    for row in rows:
        assert row["step_ms"] > 0 and row["step_min_ms"] <= row["step_ms"]
        assert math.isfinite(row["over_plain"])
    assert all(r["over_plain"] == 0.0 for r in rows if r["case"] == "plain")
    assert all(r["grammar_wait_ms"] >= 0 and r["grammar_mask_ms"] > 0
               for r in rows if r["case"] == "all")
    assert "mask wait ms" in capsys.readouterr().out
