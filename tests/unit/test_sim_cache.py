"""The simulator with the prefix cache: prompts built from the trace's prefixes and
sessions (the same the load driver sends), hits counted, every session turn run after
the one before it; prefix pulls and migration dedup modelled on the real block
managers."""

from __future__ import annotations

from ferry.bench.sim import Simulator
from ferry.bench.trace import CacheShape, generate
from ferry.common.config import Endpoint, SchedulerConfig
from ferry.services.worker.latency_model import Profile, bundled_profile

PROFILE = bundled_profile("tiny-cpu")


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


def test_ferry_pulls_prefixes_and_dedups_migrations_with_the_real_block_managers():
    """Tenants with a skewed prefix popularity: hot prefixes' holders get busy, and ferry
    has free instances copy those prefixes instead of computing them; migrations skip the
    blocks their destinations cache. Every engine's pools end whole (pins, claims and
    reservations all returned) and the pulls raise the hit rate."""
    def run(pull: bool) -> tuple[dict, Simulator]:
        trace = [r.as_json() for r in generate(
            "tenants", num=150, rate=20.0, seed=2, max_total_tokens=3000,
            shape=CacheShape(tenants=6, prefix_min=256, prefix_max=512, skew=1.2))]
        endpoint = Endpoint(bind="sim", advertise="sim")
        cfg = SchedulerConfig(inbox=endpoint, admin=endpoint, dispatch_policy="ferry",
                              prefix_pull=pull, kv_bandwidth_bytes_s=300e9)
        sim = Simulator(trace, profile=Profile.load(PROFILE), num_instances=3, policy="ferry",
                        kv_blocks=2000, scheduler_config=cfg)
        result = sim.run()
        for inst in sim.instances.values():
            inst.engine.check_invariants()
            assert inst.engine.blocks.num_used == inst.engine.blocks.num_reserved == 0
        return result, sim

    pulled, sim = run(True)
    plain, _ = run(False)
    assert pulled["num_failed"] == plain["num_failed"] == 0
    assert pulled["num_pulls"] > 0 and pulled["num_pulls_ok"] == pulled["num_pulls"]
    assert pulled["num_pull_blocks"] > 0 and plain["num_pulls"] == 0
    assert sim.core.counters.num_pulls == pulled["num_pulls"]
    assert pulled["cache_hit_rate"] > plain["cache_hit_rate"]
    assert pulled["num_migration_blocks_skipped"] > 0  # some moves found their prefix there
