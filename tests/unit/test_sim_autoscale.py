"""The simulator's auto-scaling accounting: scale events, drain times, instance-seconds,
and the mechanism the auto-scaling comparison rests on — a drained instance empties by
migration under llumnix, but only when its requests finish under least_load."""

from __future__ import annotations

import pytest

from ferry.bench.sim import Simulator
from ferry.common.config import Endpoint, SchedulerConfig
from ferry.services.worker.latency_model import Profile, bundled_profile

PROFILE = bundled_profile("llama2-7b-h200")
OUTPUT_TOKENS = 1500  # ~6 s of decode steps: much longer than the 1 s autoscaler tick
KV_BLOCKS = 224  # one instance holds both requests at full length (2 x 100 blocks)


def simulate(policy: str) -> dict:
    endpoint = Endpoint(bind="sim", advertise="sim")
    cfg = SchedulerConfig(
        inbox=endpoint, admin=endpoint, dispatch_policy=policy,
        enable_migration=policy == "llumnix", migration_interval_s=0.05,
        min_workers=1, max_workers=2,
        # Two instances with one request each are far above the band: one is drained.
        scale_up_freeness=0.0, scale_down_freeness=10.0, scale_cooldown_s=1.0)
    trace = [{"arrival_s": 0.0, "prompt_tokens": 100, "output_tokens": OUTPUT_TOKENS,
              "priority": "normal"} for _ in range(2)]
    sim = Simulator(trace, profile=Profile.load(PROFILE), num_instances=2, policy=policy,
                    kv_blocks=KV_BLOCKS, scheduler_config=cfg, autoscale=True)
    return sim.run()


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {policy: simulate(policy) for policy in ("least_load", "llumnix")}


def test_one_drain_and_no_scale_up_under_either_policy(results):
    for result in results.values():
        assert result["num_requests"] == 2
        assert (result["num_scale_ups"], result["num_drains"]) == (0, 1)
        assert result["num_instances_max"] == 2


def test_llumnix_empties_the_drained_instance_by_migration_within_a_tick(results):
    llumnix = results["llumnix"]
    assert llumnix["num_migrations"] == 1
    assert llumnix["drain_s"]["mean"] <= 1.0


def test_least_load_waits_for_the_drained_instance_request_to_finish(results):
    least_load = results["least_load"]
    assert least_load["num_migrations"] == 0
    # Drained at the 2 s tick (the band held for the 1 s cooldown), and still draining when
    # its request finishes, the last to.
    assert least_load["drain_s"]["mean"] == pytest.approx(least_load["sim_end_s"] - 2.0)
    assert least_load["drain_s"]["mean"] > 2.0
    assert least_load["drain_instance_seconds"] == pytest.approx(least_load["drain_s"]["mean"])


def test_instance_seconds_add_up(results):
    for result in results.values():
        serving_s = result["sim_end_s"]  # the instance that stays
        drained_s = 2.0 + result["drain_instance_seconds"]  # serving until the 2 s tick
        assert result["instance_seconds"] == pytest.approx(serving_s + drained_s)
        assert result["mean_instances"] == pytest.approx(
            result["instance_seconds"] / result["sim_end_s"])
    assert results["llumnix"]["instance_seconds"] < results["least_load"]["instance_seconds"]
