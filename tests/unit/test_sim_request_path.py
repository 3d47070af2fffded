"""The simulator's request path (bench/sim.py RequestPath): a request reaches the
scheduler in_s after the client sent it, and its tokens reach the client out_s after
the step that made them; a multi-turn session's next turn waits for the client."""

from __future__ import annotations

import pytest

from ferry.bench.metrics import RequestRecord
from ferry.bench.sim import RequestPath, Simulator
from ferry.bench.trace import generate
from ferry.services.worker.latency_model import Profile, bundled_profile


def _run(kind: str, path: RequestPath | None) -> dict[str, RequestRecord]:
    trace = [r.as_json() for r in generate(kind, num=40, rate=4.0, seed=3,
                                           max_total_tokens=1200)]
    sim = Simulator(trace, profile=Profile.load(bundled_profile("tiny-cpu")),
                    num_instances=1, policy="least_load", kv_blocks=2000,
                    step_spread_seed=None, request_path=path)
    sim.run()
    return sim.records


def test_a_lone_request_pays_the_path_both_ways():
    plain = _run("M-M", None)
    slow = _run("M-M", RequestPath(in_s=0.004, out_s=0.003))
    first = min(plain, key=lambda r: plain[r].arrival_s)  # nothing ahead of it
    ttft = {name: r[first].first_token_s - r[first].arrival_s
            for name, r in (("plain", plain), ("slow", slow))}
    assert ttft["slow"] == pytest.approx(ttft["plain"] + 0.007, abs=1e-9)
    assert slow[first].arrival_s == plain[first].arrival_s  # the client sent it on time


def test_a_sessions_next_turn_leaves_after_the_client_saw_the_last_one():
    path = RequestPath(in_s=0.0, out_s=0.05)
    plain, slow = _run("multiturn", None), _run("multiturn", path)
    later = [i for i in plain if plain[i].arrival_s > 0 and slow[i].arrival_s > 0]
    drift = [slow[i].arrival_s - plain[i].arrival_s for i in later]
    # first turns come on the trace's clock; a later turn at least one out_s late
    assert min(drift) == pytest.approx(0.0, abs=1e-9)
    assert max(drift) >= 0.05 - 1e-9


def test_parse_in_milliseconds_and_refuse_nonsense():
    assert RequestPath.parse("4,2.5") == RequestPath(0.004, 0.0025)
    for bad in ("4", "a,b", "-1,2", "1,2,3"):
        with pytest.raises(ValueError, match="request path"):
            RequestPath.parse(bad)


def test_distinct_prompts_turn_the_prefix_cache_on_for_a_plain_trace():
    trace = [r.as_json() for r in generate("M-M", num=60, rate=40.0, seed=1,
                                           max_total_tokens=1500)]

    def run(distinct: bool) -> Simulator:
        sim = Simulator(trace, profile=Profile.load(bundled_profile("tiny-cpu")),
                        num_instances=1, policy="least_load", kv_blocks=150,
                        step_spread_seed=None, distinct_prompts=distinct)
        sim.run()
        return sim

    plain, distinct = run(False), run(True)
    assert not plain.engine_config.enable_prefix_cache
    assert distinct.engine_config.enable_prefix_cache
    assert distinct.records["r0"].num_prompt_tokens == trace[0]["prompt_tokens"]
    # under this much pressure requests are preempted, and their recompute hits
    engine = distinct.instances["i0"].engine
    assert engine.scheduler.num_preemptions > 0
    assert distinct._result()["cache_hit_rate"] > 0
