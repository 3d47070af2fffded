"""ferry bench prefix-sweep: what it reads off the runs (pure), and one tiny sweep end to end."""

from __future__ import annotations

import json

import pytest

from ferry.bench.prefix_sweep import (
    KindSpec,
    Variant,
    main,
    paired_ratios,
    slo_rate,
    summarize,
)


def metrics(p99: float, mean: float = 0.1, e2e: float = 1.0) -> dict:
    return {"ttft_p50_s": mean, "ttft_p99_s": p99, "ttft_mean_s": mean, "tpot_p99_s": 0.01,
            "e2e_mean_s": e2e, "throughput_rps": 10.0, "hit_rate": 0.5, "pulls": 0,
            "migrations": 0, "failed": 0}


def test_specs_parse_and_refuse_what_they_cannot_read():
    spec = KindSpec.parse("tenants:300,400:6000:--skew 1.2")
    assert spec == KindSpec("tenants", (300.0, 400.0), 6000, ("--skew", "1.2"))
    assert KindSpec.parse("longctx:20:100").trace_flags == ()
    with pytest.raises(ValueError, match="kind:rates:num"):
        KindSpec.parse("tenants:300")
    assert Variant.parse("ferry") == Variant("ferry", "ferry", ())
    assert Variant.parse("longctx:ferry-hold=ferry --hold-until-room") == Variant(
        "ferry-hold", "ferry", ("--hold-until-room",), "longctx")


def test_ratios_pair_seeds_and_skip_the_unshared():
    base = {0: metrics(2.0), 1: metrics(9.0), 2: metrics(1.0)}
    ref = {0: metrics(1.0), 1: metrics(3.0)}  # seed 2 not run yet
    vs = paired_ratios(base, ref)
    assert vs["seeds"] == [0, 1]
    assert vs["ttft_p99_s"] == {"median": 2.5, "min": 2.0, "max": 3.0}
    assert paired_ratios({5: metrics(1.0)}, ref) is None


def test_slo_rate_interpolates_between_the_last_pass_and_the_first_miss():
    assert slo_rate([(100, 0.5), (200, 1.5), (300, 4.0)], 1.0) == "150"
    assert slo_rate([(300, 4.0), (100, 0.5), (200, 1.5)], 2.0) == "220"  # any order
    assert slo_rate([(100, 0.5), (200, 0.9)], 1.0) == ">=200"
    assert slo_rate([(100, 1.5), (200, 3.0)], 1.0) == "<100"
    # not monotone (a noisy middle point): the first miss bounds it
    assert slo_rate([(100, 0.5), (200, 1.5), (300, 0.8)], 1.0) == "150"


def test_summary_rows_carry_medians_ratios_and_slo_rates():
    results = {("t", 100.0, "ferry"): {0: metrics(0.5), 1: metrics(0.7)},
               ("t", 100.0, "ll"): {0: metrics(1.0), 1: metrics(2.1)},
               ("t", 200.0, "ferry"): {0: metrics(0.9), 1: metrics(1.1)},
               ("t", 200.0, "ll"): {0: metrics(3.0), 1: metrics(5.0)}}
    summary = summarize(results, "ferry")
    rows = {(r["rate"], r["variant"]): r for r in summary["rows"]}
    assert rows[100.0, "ll"]["ttft_p99_s"] == pytest.approx(1.55)
    assert rows[100.0, "ll"]["vs_reference"]["ttft_p99_s"]["median"] == pytest.approx(2.5)
    assert "vs_reference" not in rows[100.0, "ferry"]
    assert summary["slo"]["t"] == {"ferry": {"1s": ">=200", "2s": ">=200"},
                                   "ll": {"1s": "<100", "2s": "118"}}


def test_a_tiny_sweep_runs_resumes_and_tabulates(tmp_path, capsys):
    argv = ["--out-dir", str(tmp_path), "--kind", "tenants:40:60:--tenants 4 --prefix-min 64 "
            "--prefix-max 128", "--variant", "least_load", "--variant", "ferry",
            "--seeds", "0,1", "--jobs", "2", "--sim-args", "--instances 2"]
    main(argv)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tenants-40-s0-ferry.json", "tenants-40-s0-least_load.json",
                    "tenants-40-s1-ferry.json", "tenants-40-s1-least_load.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["ferry", "least_load"]
    assert summary["rows"][1]["vs_reference"]["seeds"] == [0, 1]
    assert "| tenants | 40 | least_load |" in (tmp_path / "table.md").read_text()
    # a second run simulates nothing: every run's JSON is there
    stamp = (tmp_path / "runs" / runs[0]).stat().st_mtime_ns
    main(argv)
    assert (tmp_path / "runs" / runs[0]).stat().st_mtime_ns == stamp
