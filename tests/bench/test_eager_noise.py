"""The eager-step spread bench (bench/eager_noise.py) runs on the tiny model on CPU: every
shape in both modes, a spread >= 1 each."""

from __future__ import annotations

import json

from ferry.bench import eager_noise


def test_every_shape_runs_quiet_and_beside_a_busy_thread(tmp_path, capsys):
    out = tmp_path / "noise.json"
    eager_noise.main(["--model", "tiny", "--device", "cpu", "--repeats", "3",
                      "--kv-blocks", "512", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["P"], r["D"], r["C"], r["mode"]) for r in rows] == [
        (*shape, mode) for shape in eager_noise.SHAPES for mode in ("quiet", "gil")]
    for r in rows:
        assert 0 < r["p10_ms"] <= r["p50_ms"] <= r["p90_ms"] and r["spread"] >= 1.0
    assert "p90/p10" in capsys.readouterr().out
