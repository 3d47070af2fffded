import json

import pytest

from experiments import sim_check_summary


def _summary(p99, p50=0.05, hits=None):
    return {"ttft_p50": p50, "ttft_p99": p99, "decode_p99": 0.01, "e2e_mean": 5.0,
            "preemptions": 0, "req_per_s": 3.0, "cache_hit_rate": hits}


def _run(tmp_path, name, rows, device="NVIDIA H100 80GB HBM3"):
    run = tmp_path / name
    run.mkdir()
    (run / "sim_check.json").write_text(json.dumps(
        {"device": device, "model": "random:llama3-8b", "kv_blocks": 25000, "num": 100,
         "rows": rows}))
    return run


def test_rows_use_the_spread_and_path_and_count_the_ones_within_15_percent(tmp_path, capsys):
    spread = _summary(1.1) | {"ttft_p99_min": 1.0, "ttft_p99_max": 1.2, "seeds": 5}
    with_path = _run(tmp_path, "a", [{
        "kind": "sharegpt", "rate": 4.0, "real": _summary(1.0, hits=0.2),
        "real_ttft_p99_interval": [0.4, 1.5],
        "sim_cycle": _summary(0.8), "sim_cycle_spread": spread,
        "sim_cycle_spread_path": spread | {"ttft_p99": 1.3, "cache_hit_rate": 0.25}}])
    no_path = _run(tmp_path, "b", [{
        "kind": "L-L", "rate": 2.0, "real": _summary(2.0), "sim_cycle": _summary(2.0),
        "sim_cycle_spread": spread | {"ttft_p99": 2.2}}], device="NVIDIA H200")
    sim_check_summary.main([f"one={with_path}", f"two={no_path}"])
    out = capsys.readouterr().out
    first, second = [line for line in out.splitlines() if line.startswith("| H")]
    assert ("| H100 | llama3-8b | 25000 | one | sharegpt | 4.00 | 100 | 1.000 | 0.400–1.500 | "
            "1.300 |") in first
    assert "**1.30** | 0.80 |" in first and "20.0% / 25.0%" in first
    assert first.endswith("| 20.0% / 25.0% |")
    assert "| H200 |" in second and "| – | 2.200 (no path)" in second and "**1.10**" in second
    # 1.30 is outside 15%, but inside what 100 requests pin the real P99 to
    assert "1 of 2 rows within 15% on P99 TTFT; of the 1 outside, 1 inside" in out


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit):
        sim_check_summary.main(["no-label"])
    with pytest.raises(SystemExit):
        sim_check_summary.main([f"x={tmp_path}"])  # no sim_check.json
    bare = _run(tmp_path, "bare", [{"kind": "M-M", "rate": 1.0, "real": _summary(1.0),
                                    "sim_cycle": _summary(1.0)}])
    with pytest.raises(SystemExit):
        sim_check_summary.main([f"x={bare}"])  # no spread seeds
