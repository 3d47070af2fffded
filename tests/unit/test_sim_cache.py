"""The simulator with the prefix cache: prompts built from the trace's prefixes and
sessions (the same the load driver sends), hits counted, every session turn run after
the one before it."""

from __future__ import annotations

from pathlib import Path

from ferry.bench.sim import Simulator
from ferry.bench.trace import CacheShape, generate
from ferry.services.worker.latency_model import Profile

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "tiny-cpu.json"


def simulate(kind: str, policy: str, **shape) -> tuple[dict, Simulator]:
    trace = [r.as_json() for r in generate(kind, num=120, rate=20.0, seed=2,
                                           shape=CacheShape(**shape), max_total_tokens=3000)]
    sim = Simulator(trace, profile=Profile.load(PROFILE), num_instances=3, policy=policy,
                    kv_blocks=2000)
    return sim.run(), sim


def test_tenants_hit_their_prefixes_and_cache_aware_placement_hits_more():
    shape = {"tenants": 6, "prefix_min": 256, "prefix_max": 512}
    ferry, _ = simulate("tenants", "ferry", **shape)
    rr, _ = simulate("tenants", "round_robin", **shape)
    assert ferry["num_failed"] == rr["num_failed"] == 0
    assert ferry["prefix_cache"] and ferry["cache_hit_rate"] > 0.35  # of at most ~0.58
    assert ferry["cache_hit_rate"] > rr["cache_hit_rate"]


def test_sessions_run_turn_after_turn_and_hit_their_history():
    result, sim = simulate("multiturn", "ferry", turns=4, think_s=0.5)
    assert result["num_failed"] == 0 and result["num_requests"] == 120
    assert result["cache_hit_rate"] > 0.3  # every later turn finds the conversation so far
    by_session: dict[str, list] = {}
    for i, entry in enumerate(sim.trace):
        by_session.setdefault(entry["session_id"], []).append(sim.records[f"r{i}"])
    for records in by_session.values():
        for earlier, later in zip(records, records[1:], strict=False):
            assert later.arrival_s >= earlier.finish_s  # think time after the previous turn
