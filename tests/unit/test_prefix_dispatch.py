"""Cache-aware placement: the scheduler's prefix index (kept exact from the workers'
report events, resynced by snapshot after a lost report), and the decisions of the
cache-aware policies (ferry, prefix_affinity) and the paper's baseline (infaas) on
crafted tables, ties included."""

from __future__ import annotations

import dataclasses

from ferry.common.wire import CacheSnapshotRequest, LoadReport, Register
from ferry.services.scheduler.dispatch import Demand, Ferry, Infaas, PrefixAffinity
from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.prefix_index import PrefixIndex
from tests.unit.test_scheduler_core import addr, make_core, request

# ---- the index ------------------------------------------------------------------------------


def test_index_hits_are_leading_runs_per_instance():
    index = PrefixIndex()
    index.stored("a", [1, 2, 3])
    index.stored("b", [1, 2, 9])
    index.stored("c", [2, 3])
    assert index.hits([1, 2, 3, 4], ["a", "b", "c", "d"]) == {"a": 3, "b": 2, "c": 0, "d": 0}
    index.apply("a", stored=[4], evicted=[2])
    assert index.hits([1, 2, 3, 4], ["a", "b"]) == {"a": 1, "b": 2}  # a lost block 2
    index.replace("b", [7])
    assert index.hits([1, 2], ["b"]) == {"b": 0} and index.hits([7], ["b"]) == {"b": 1}
    index.drop("a")
    assert len(index) == 1 + 2  # b's 7, c's 2 and 3
    assert index.hits([1], ["a", "b", "c"]) == {"a": 0, "b": 0, "c": 0}


def report(core, instance_id, seq, now, **cache):
    return core.load_report(LoadReport(
        instance_id=instance_id, inbox_addr=addr(instance_id), seq=seq,
        num_dispatch_received=0, load=empty_load(100), **cache), now)


def register_cached(core, instance_id, now=0.0):
    return core.register(Register(
        instance_id=instance_id, inbox_addr=addr(instance_id), num_blocks=100, block_size=16,
        max_model_len=4096, req_ids=(), prefix_seed=77), now)


def test_the_scheduler_indexes_report_events_and_resyncs_after_a_gap():
    core = make_core(dispatch_policy="ferry")
    assert register_cached(core, "w0") == [(addr("w0"), CacheSnapshotRequest())]
    report(core, "w0", 1, 0.1, cache_snapshot=(10, 11))
    report(core, "w0", 2, 0.2, cache_stored=(12,), cache_evicted=(10,))
    assert core.prefix_index.hits([10, 11], ["w0"]) == {"w0": 0}  # 10 evicted: no run
    assert core.prefix_index.hits([11, 12], ["w0"]) == {"w0": 2}
    # report 3 was lost: its events are missing; ask for the whole cache again
    out = report(core, "w0", 4, 0.3, cache_stored=(13,))
    assert out == [(addr("w0"), CacheSnapshotRequest())]
    assert report(core, "w0", 5, 0.4) == []  # asked already (at most every heartbeat timeout)
    report(core, "w0", 6, 0.5, cache_snapshot=(20, 21))
    assert core.prefix_index.hits([20, 21], ["w0"]) == {"w0": 2}
    assert core.prefix_index.hits([12], ["w0"]) == {"w0": 0}
    # its view tells gateways how to hash
    view = core.instance_view()
    assert (view.prefix_seed, view.block_size) == (77, 16)


def test_a_request_goes_where_its_prefix_is_cached_and_counts_only_new_memory():
    core = make_core(dispatch_policy="ferry", hold_until_room=False)
    for w in ("w0", "w1"):
        register_cached(core, w)
        report(core, w, 1, 0.0, cache_snapshot=())
    report(core, "w1", 2, 0.1, cache_stored=tuple(range(100, 140)))  # 40 blocks cached
    req = dataclasses.replace(request("r0", prompt_len=16 * 41),
                              prefix_hashes=tuple(range(100, 141)))
    assert core.dispatch(req, now=0.2) == "w1"
    # w1's load counted 41 - 40 blocks for it, not 41
    assert core.table.load("w1").num_free_blocks == 100 - 1
    assert core.counters.num_cached_blocks_placed == 40
    # the node that died takes its cache with it
    core.table.mark_dead("w1")
    core._instance_down("w1", 1.0, reason="test")
    assert core.prefix_index.hits(list(range(100, 141)), ["w1"]) == {"w1": 0}


# ---- the policies on crafted tables ---------------------------------------------------------


def load(free=400, waiting=0, queued_blocks=0, rate=1000.0, step_s=0.01, running=0):
    return dataclasses.replace(empty_load(400), num_free_blocks=free, num_waiting=waiting,
                               waiting_demand_blocks=queued_blocks, num_running=running,
                               pending_prefill_tokens=queued_blocks * 16,
                               prefill_tokens_per_s=rate, step_time_ewma_s=step_s)


def demand(cached, *, tokens=1600, blocks=100):
    return Demand(num_tokens=tokens, block_size=16, num_prefix_blocks=blocks,
                  cached_blocks=cached)


def test_ferry_takes_the_cache_when_it_saves_more_than_the_queue_costs():
    loads = {"hot": load(waiting=2, queued_blocks=10), "cold": load()}
    # 1600 tokens, 1400 cached on hot: hot costs (160 + 200) / 1000 s, cold 1600 / 1000 s
    assert Ferry().choose(loads, demand=demand({"hot": 87})) == "hot"
    # a long queue on hot outweighs the saving: (3200 + 208) vs 1600 tokens
    loads["hot"] = load(waiting=20, queued_blocks=200)
    assert Ferry().choose(loads, demand=demand({"hot": 87})) == "cold"
    # a hot prefix on a slow (busy) instance: its measured rate counts
    loads["hot"] = load(rate=100.0)
    assert Ferry().choose(loads, demand=demand({"hot": 87})) == "cold"


def test_ferry_needs_room_for_the_uncached_part_only():
    # hot has 20 free blocks: not enough for 100 blocks, enough for the 13 it lacks
    loads = {"hot": load(free=20), "cold": load(free=50)}
    assert Ferry().choose(loads, demand=demand({"hot": 87})) == "hot"
    # with nothing cached, neither has room: the most room wins
    assert Ferry().choose(loads, demand=demand({})) == "cold"


def test_ferry_ties_go_to_the_freest_then_rotate():
    loads = {"a": load(free=190, running=1), "b": load(free=190, running=3)}
    assert Ferry().choose(loads, demand=demand({})) == "a"  # same estimate: higher F
    policy = Ferry()
    even = {"a": load(), "b": load(), "c": load()}
    assert [policy.choose(even, demand=demand({})) for _ in range(3)] == ["a", "b", "c"]


def test_prefix_affinity_follows_the_longest_prefix_until_load_outweighs_it():
    loads = {"hot": load(waiting=4), "cold": load(waiting=0)}
    # prefix 3 * 0.9 + queue 0 + kv 1 = 3.7 vs 0 + 1 + 1 = 2
    assert PrefixAffinity().choose(loads, demand=demand({"hot": 90})) == "hot"
    # a short hit loses to the idle instance: 3 * 0.2 + 0 + 1 = 1.6 < 2
    assert PrefixAffinity().choose(loads, demand=demand({"hot": 20})) == "cold"
    # full memory weighs 1: 3 * 0.5 + 1 + 0.1 = 2.6 vs 0 + 1 + 1
    loads = {"hot": load(free=40), "cold": load()}
    assert PrefixAffinity().choose(loads, demand=demand({"hot": 50})) == "hot"
    # no hashes (a short prompt): load alone, ties rotate
    policy = PrefixAffinity()
    even = {"a": load(), "b": load()}
    assert [policy.choose(even, demand=Demand()) for _ in range(2)] == ["a", "b"]


def test_infaas_is_pure_freeness_even_into_a_full_instance():
    # the paper's baseline: few requests, little memory beats many requests, much memory
    loads = {"full": load(free=20, running=2), "roomy": load(free=200, running=40)}
    assert Infaas().choose(loads) == "full"  # F 10 vs 5: no room tier (llumnix has one)


def test_ferry_counts_the_queue_by_its_uncached_prefill_not_its_memory():
    """Queued requests that hit the cache cost little prefill: a cached instance with a
    queue of them stays the better choice (the worker reports pending_prefill_tokens)."""
    queue_of_hits = dataclasses.replace(load(waiting=6, queued_blocks=6 * 40),
                                        pending_prefill_tokens=6 * 50)
    loads = {"hot": queue_of_hits, "cold": load()}
    assert Ferry().choose(loads, demand=demand({"hot": 87})) == "hot"

