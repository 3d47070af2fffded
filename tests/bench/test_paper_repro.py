"""The capacity estimate rates are set from, and the isolation bound on what priorities
can give high-priority requests."""

from __future__ import annotations

import pytest

from experiments.paper_repro import capacity_rate, isolated_e2e_s
from ferry.services.worker.latency_model import LatencyModel


def test_isolated_e2e_is_prefill_chunks_then_one_decode_step_per_further_token():
    latency = LatencyModel(base_s=1.0, per_prefill_token_s=0.1, per_prefill_attn_s=0.001,
                           per_decode_seq_s=0.01, per_decode_context_s=0.001)
    trace = [
        {"priority": "high", "prompt_tokens": 10, "output_tokens": 3},
        {"priority": "high", "prompt_tokens": 4, "output_tokens": 1},
        {"priority": "normal", "prompt_tokens": 1000, "output_tokens": 1000},
    ]
    # First: chunks of 6 and 4 tokens (attention q_len * kv_len: 6 * 6, 4 * 10), then the
    # decode steps for output tokens 1 and 2 over caches of 11 and 12 tokens.
    first = (1 + 0.6 + 0.036) + (1 + 0.4 + 0.040) + (1 + 0.01 + 0.011) + (1 + 0.01 + 0.012)
    second = 1 + 0.4 + 0.016  # one chunk; its only output token comes with it
    assert isolated_e2e_s(trace, latency, priority="high", chunk_tokens=6) == pytest.approx(
        (first + second) / 2
    )


def test_capacity_weighs_each_request_by_the_token_steps_it_holds():
    # Step time: 1 ms + 0.1 ms per sequence in the batch (context is free).
    latency = LatencyModel(base_s=1e-3, per_prefill_token_s=0.0, per_prefill_attn_s=0.0,
                           per_decode_seq_s=1e-4, per_decode_context_s=0.0)
    # Token-steps: 1 * 10 + 1 = 11 and 9 * 1 + 9 * 10 / 2 = 54; mean 32.5 over 5 steps.
    trace = [{"prompt_tokens": 10, "output_tokens": 1}, {"prompt_tokens": 1, "output_tokens": 9}]
    kv_tokens = 650
    concurrency = kv_tokens * 5 / 32.5  # 100 requests fill an instance on time-average
    step_s = 1e-3 + 1e-4 * concurrency
    expected = 2 * kv_tokens / (32.5 * step_s)  # memory-bound: prefill is free here
    assert capacity_rate(trace, instances=2, kv_tokens=kv_tokens, latency=latency) == \
        pytest.approx(expected)


def test_capacity_adds_each_prefill_to_the_decode_share():
    # Prefill: 0.1 ms per prompt token and 1 us per q x kv pair; decode steps of 1 ms.
    latency = LatencyModel(base_s=1e-3, per_prefill_token_s=1e-4, per_prefill_attn_s=1e-6,
                           per_decode_seq_s=0.0, per_decode_context_s=0.0)
    trace = [{"prompt_tokens": 100, "output_tokens": 2}]
    kv_tokens = 1000
    # 2 * 100 + 3 = 203 token-steps over 2 steps: 1000 * 2 / 203 requests fill an instance.
    decode_share = 2 * 1e-3 / (kv_tokens * 2 / 203)
    prefill = 100 * 1e-4 + 100 * 100 * 1e-6
    assert capacity_rate(trace, instances=3, kv_tokens=kv_tokens, latency=latency) == \
        pytest.approx(3 / (prefill + decode_share))


def test_capacity_is_lower_for_a_heavy_tail_than_for_its_means():
    """Same mean lengths, one long request instead of many medium ones: the long one holds
    its tokens for many more steps, so the cluster sustains fewer requests per second."""
    latency = LatencyModel(base_s=1e-3, per_prefill_token_s=0.0, per_prefill_attn_s=0.0,
                           per_decode_seq_s=0.0, per_decode_context_s=0.0)
    even = [{"prompt_tokens": 100, "output_tokens": 100}] * 10
    tailed = [{"prompt_tokens": 100, "output_tokens": 10}] * 9 + \
        [{"prompt_tokens": 100, "output_tokens": 910}]
    cap = {name: capacity_rate(t, instances=1, kv_tokens=10_000, latency=latency)
           for name, t in (("even", even), ("tailed", tailed))}
    assert cap["tailed"] < cap["even"] / 2


def test_preemption_sites_split_by_cluster_free_share_and_the_others_room():
    from experiments.preemption_sites import classify

    sites = [(3, 10, 0), (2, 100, 50), (1, 500, 150)]  # (new, cluster free, median other)
    assert classify(sites, total_blocks=1000) == {
        "total": 6, "cluster_free_below_5pct": 3, "cluster_free_5_to_15pct": 2,
        "cluster_free_above_15pct": 1, "median_other_has_room": 1}


def _row(policy: str, p99_by_seed: list[float], *, load: float = 0.9, kind: str = "M-M") -> dict:
    return {"kind": kind, "rate": 100 * load, "load_fraction": load, "policy": policy,
            "p99_prefill_by_seed": p99_by_seed,
            "prefill_latency_s": {"p99": sorted(p99_by_seed)[len(p99_by_seed) // 2]},
            "decode_latency_s": {"p99": 0.02}, "e2e_latency_s": {"mean": 1.0}}


def test_paired_ratio_compares_each_seed_with_itself():
    from experiments.paper_report import paired_ratio
    # Medians 2.0 vs 4.0 would read 0.5x; seed by seed the policy is 2x better twice.
    least_load = _row("least_load", [8.0, 2.0, 0.2])
    llumnix = _row("llumnix", [4.0, 1.0, 4.0])
    assert paired_ratio(least_load, llumnix) == pytest.approx(2.0)
    assert paired_ratio({"p99_prefill_by_seed": []}, {"p99_prefill_by_seed": []}) is None


def test_sustained_load_stops_at_the_first_rate_past_the_slo_per_seed():
    from experiments.paper_report import sustained_loads
    rows = [_row("llumnix", [0.2, 0.2, 3.0], load=0.8),
            _row("llumnix", [0.5, 3.0, 0.2], load=0.9),
            _row("llumnix", [0.9, 0.3, 0.2, 9.0], load=0.95)]  # a 4th seed not run everywhere
    # Seed 1 recovers at 0.95 but missed at 0.9: it sustained 0.8. Seed 2 missed the lowest.
    assert sustained_loads(rows, slo_s=1.0) == [0.95, 0.8, 0.0]


def test_ratio_table_has_a_row_per_migrating_policy_against_least_load():
    from experiments.paper_report import ratio_table, with_rates_of
    rows = [_row("least_load", [2.0, 2.0]), _row("llumnix", [1.0, 1.0]),
            _row("growth0", [4.0, 1.0]), _row("round_robin", [9.0, 9.0])]
    lines = ratio_table(rows)[2:]
    assert [line.split(" | ")[2] for line in lines] == ["llumnix", "growth0"]
    assert "| 2.00x | 2.00x | 2 / 0 of 2 |" in lines[0]
    assert "1 / 1 of 2" in lines[1]
    extra = [_row("llumnix", [0.1], load=0.9)]
    merged = with_rates_of(extra, [_row("llumnix", [5.0], load=0.9),
                                   _row("llumnix", [0.2], load=0.8)])
    assert [r["p99_prefill_by_seed"] for r in merged] == [[0.1], [0.2]]


def test_tail_sites_count_the_slowest_prefills_that_found_no_room_anywhere():
    from experiments.preemption_sites import classify_tail

    # (need, best room, cluster free) per request; r2 and r3 are the slowest 2 of 4.
    arrivals = {"r0": (2, 50, 900), "r1": (2, 40, 800), "r2": (10, -5, 100),
                "r3": (4, 6, 300)}
    latencies = {"r0": 0.01, "r1": 0.02, "r2": 3.0, "r3": 1.0}
    assert classify_tail(arrivals, latencies, total_blocks=1000, fraction=0.5) == {
        "tail_requests": 2, "tail_fastest_s": 1.0, "tail_no_room_anywhere": 1,
        "tail_median_need_blocks": 7, "tail_median_cluster_free_share": 0.2}


def test_central_queue_table_puts_each_mode_of_a_seed_on_one_row():
    from experiments.paper_report import central_queue_table

    rows = [{"kind": "L-L", "rate": 56.0, "seed": 0, "policy": p, "central_queue": m,
             "p99_prefill_s": v}
            for p, m, v in (("least_load", False, 2.0), ("llumnix", False, 0.7),
                            ("llumnix", "reported", 0.4))]
    lines = central_queue_table(rows)
    assert len(lines) == 3
    assert lines[2] == "| L-L | 56 | 0 | 2.00 | - | - | 0.70 | - | 0.40 |"
