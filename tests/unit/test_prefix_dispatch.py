"""Cache-aware placement: the scheduler's prefix index (kept exact from the workers'
report events, resynced by snapshot after a lost report), and the decisions of the
cache-aware policies (ferry, prefix_affinity) and the paper's baseline (infaas) on
crafted tables, ties included; ferry's prefix pulls (when a free instance copies a busy
one's cached prefix) and the PullPrefix the core sends instead of the Dispatch."""

from __future__ import annotations

import dataclasses

from ferry.common.wire import CacheSnapshotRequest, LoadReport, PullDone, Register
from ferry.services.scheduler.dispatch import Choice, Demand, Ferry, Infaas, PrefixAffinity
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



# ---- ferry's prefix pulls on crafted tables -------------------------------------------------

NVLINK = 200e9
BLOCK_BYTES = 2 * 1024 * 1024  # llama3-8b: 128 KiB of KV per token, 16 tokens a block


def pull_demand(held, *, cached=None, tokens=1600, block_bytes=BLOCK_BYTES):
    return Demand(num_tokens=tokens, block_size=16, num_prefix_blocks=tokens // 16,
                  cached_blocks=cached if cached is not None else held, held_blocks=held,
                  kv_block_bytes=block_bytes)


def busy(pending_tokens, **kw):
    return dataclasses.replace(load(**kw), pending_prefill_tokens=pending_tokens)


def test_ferry_pulls_the_prefix_from_a_busy_holder_to_a_free_instance():
    # hot: 5 s of prefill queued; cold: idle. Copying 87 blocks (182 MB) at 200 GB/s takes
    # ~3 ms, computing their 1392 tokens 1.4 s at 1000 tok/s: cold pulls, then prefills 208
    loads = {"hot": busy(5000), "cold": load()}
    choice = Ferry(kv_bandwidth_bytes_s=NVLINK).place(loads, demand=pull_demand({"hot": 87}))
    assert choice == Choice("cold", pull_src="hot", num_pull_blocks=87)
    # pulls off (no bandwidth given, or block size unknown): cold computes it all
    assert Ferry().place(loads, demand=pull_demand({"hot": 87})) == Choice("cold")
    no_size = pull_demand({"hot": 87}, block_bytes=0)
    assert Ferry(kv_bandwidth_bytes_s=NVLINK).place(loads, demand=no_size) == Choice("cold")


def test_ferry_does_not_pull_when_the_holder_is_free_or_the_copy_costs_more():
    policy = Ferry(kv_bandwidth_bytes_s=NVLINK)
    # hot idle: 0.218 s there beats 0.221 s for a pull to cold
    assert policy.place({"hot": load(), "cold": load()},
                        demand=pull_demand({"hot": 87})) == Choice("hot")
    # a slow link (1 MB/s): 182 s of copy vs 1.4 s of compute: cold computes
    slow = Ferry(kv_bandwidth_bytes_s=1e6)
    assert slow.place({"hot": busy(5000), "cold": load()},
                      demand=pull_demand({"hot": 87})) == Choice("cold")
    # the free instance has no room for the request: no pull there (hot keeps it)
    assert policy.place({"hot": busy(5000), "cold": load(free=5)},
                        demand=pull_demand({"hot": 87})) == Choice("hot")


def test_ferry_pull_evicts_at_most_a_small_share_of_the_destinations_cache():
    """A copy that would evict more than PULL_EVICT_FRACTION of the destination's KV in
    cached prefixes is no option: it trades other sessions' hits for this one's
    (multi-turn with scarce KV: hit rate 0.84 -> 0.73, P99 TTFT 69 -> 115 ms)."""
    policy = Ferry(kv_bandwidth_bytes_s=NVLINK)
    pulled = Choice("cold", pull_src="hot", num_pull_blocks=87)
    # cold (400 blocks, all free): the request needs 101 (87 copied, 13 computed, 1 more)
    for cached, expected in ((299, pulled),  # 101 empty blocks: nothing evicted
                             (303, pulled),  # 4 evicted: 1% of 400
                             (304, Choice("cold"))):  # 5 evicted: it computes instead
        cold = dataclasses.replace(load(), num_cached_blocks=cached)
        assert policy.place({"hot": busy(5000), "cold": cold},
                            demand=pull_demand({"hot": 87})) == expected, cached


def test_ferry_pull_counts_the_destinations_own_prefix_and_its_queue():
    policy = Ferry(kv_bandwidth_bytes_s=NVLINK)
    # warm caches 40 of the 87 blocks: it copies the other 47 and holds 87
    loads = {"hot": busy(5000), "warm": busy(100), "cold": busy(150)}
    choice = policy.place(loads, demand=pull_demand({"hot": 87, "warm": 40}))
    assert choice == Choice("warm", pull_src="hot", num_pull_blocks=87)
    # the copy overlaps the queue ahead: max(3 ms, 0.1 s) + 0.208 s + a step at warm
    # vs 5.2 s at hot, 0.97 s computing 960 tokens at warm


def test_ferry_pull_sources_must_hold_the_prefix_but_may_be_full():
    """A source is any live instance caching the prefix, even one with no room (it is not
    a candidate, `cached_blocks` leaves it out): it only reads its cached blocks."""
    policy = Ferry(kv_bandwidth_bytes_s=NVLINK)
    choice = policy.place({"cold": load()},
                          demand=pull_demand({"full": 87}, cached={"cold": 0}))
    assert choice == Choice("cold", pull_src="full", num_pull_blocks=87)
    # a prompt of exactly 100 blocks: its last block holds the last token, which is always
    # computed; 99 blocks at most come from any cache
    choice = policy.place({"cold": load()},
                          demand=pull_demand({"full": 100}, cached={"cold": 0}))
    assert choice.num_pull_blocks == 99


def test_ferry_pull_ties():
    # equal TTFT with and without a pull: no pull. Copy = 2 ms + 87 * 8000 / 87e6 = 10 ms;
    # hot's queue is 10 ms too
    even = Ferry(kv_bandwidth_bytes_s=87e6)
    loads = {"hot": busy(10), "cold": load()}
    assert even.place(loads, demand=pull_demand({"hot": 87}, block_bytes=8000)) == Choice("hot")
    # two sources holding as much: they take turns; two equal destinations: the freer one,
    # then turns
    policy = Ferry(kv_bandwidth_bytes_s=NVLINK)
    loads = {"h1": busy(5000), "h2": busy(5000), "c1": load(), "c2": load()}
    picks = [policy.place(loads, demand=pull_demand({"h1": 87, "h2": 87}))
             for _ in range(4)]
    assert [p.pull_src for p in picks] == ["h1", "h2", "h1", "h2"]
    assert [p.instance_id for p in picks] == ["c1", "c2", "c1", "c2"]
    loads["c2"] = load(running=3)  # fuller batch: lower freeness
    assert {policy.place(loads, demand=pull_demand({"h1": 87, "h2": 87})).instance_id
            for _ in range(3)} == {"c1"}


# ---- the scheduler core: PullPrefix instead of the Dispatch, counters -----------------------


def register_kv(core, instance_id, *, block_bytes=BLOCK_BYTES):
    return core.register(Register(
        instance_id=instance_id, inbox_addr=addr(instance_id), num_blocks=400, block_size=16,
        max_model_len=8192, req_ids=(), prefix_seed=77, kv_block_bytes=block_bytes), 0.0)


def report_load(core, instance_id, seq, fields, **cache):
    return core.load_report(LoadReport(
        instance_id=instance_id, inbox_addr=addr(instance_id), seq=seq,
        num_dispatch_received=0, load=fields, **cache), 0.1 * seq)


def test_the_core_sends_a_pull_carrying_the_dispatch_and_counts_its_outcome():
    core = make_core(dispatch_policy="ferry", hold_until_room=False,
                     kv_bandwidth_bytes_s=NVLINK)
    for w in ("w0", "w1"):
        register_kv(core, w)
        report_load(core, w, 1, load(), cache_snapshot=())
    report_load(core, "w0", 2, busy(5000), cache_stored=tuple(range(100, 187)))
    req = dataclasses.replace(request("r0", prompt_len=1600),
                              prefix_hashes=tuple(range(100, 200)))
    assert core.dispatch(req, now=0.3) == "w1"
    pull_msg = core.pull_for(req)
    assert pull_msg is not None and core.pull_for(req) is None  # once
    assert (pull_msg.src_instance_id, pull_msg.src_inbox_addr) == ("w0", addr("w0"))
    assert pull_msg.block_hashes == tuple(range(100, 187)) and pull_msg.dispatch == req
    # w1's load counts the request's memory, and only the prefill left after the copy
    assert core.table.load("w1").pending_prefill_tokens == 1600 - 87 * 16
    done_ok = PullDone(pull_id=pull_msg.pull_id, req_id="r0", src_instance_id="w0",
                       dst_instance_id="w1", ok=True, reason="", num_blocks=87,
                       num_cached_blocks=0, num_bytes=87 * BLOCK_BYTES, copy_s=0.001,
                       total_s=0.002)
    core.pull_done(done_ok)
    core.pull_done(dataclasses.replace(done_ok, ok=False, reason="source has none",
                                       num_blocks=0))
    status = core.status(1.0)
    assert (status.num_pulls, status.num_pulls_ok, status.num_pulls_failed) == (1, 1, 1)
    assert status.num_pull_blocks == 87
    assert status.pull_fail_reasons == {"source has none": 1}
    # a request placed without a pull is forwarded as its Dispatch
    other = request("r1", prompt_len=64)
    assert core.dispatch(other, now=0.4) in ("w0", "w1") and core.pull_for(other) is None


def test_no_pull_without_the_flag_or_from_a_dead_source():
    core = make_core(dispatch_policy="ferry", hold_until_room=False, prefix_pull=False)
    for w in ("w0", "w1"):
        register_kv(core, w)
        report_load(core, w, 1, load(), cache_snapshot=())
    report_load(core, "w0", 2, busy(5000), cache_stored=tuple(range(100, 187)))
    req = dataclasses.replace(request("r0", prompt_len=1600),
                              prefix_hashes=tuple(range(100, 200)))
    assert core.dispatch(req, now=0.3) == "w1" and core.pull_for(req) is None
    core = make_core(dispatch_policy="ferry", hold_until_room=False,
                     kv_bandwidth_bytes_s=NVLINK)
    for w in ("w0", "w1"):
        register_kv(core, w)
        report_load(core, w, 1, load(), cache_snapshot=())
    report_load(core, "w0", 2, busy(5000), cache_stored=tuple(range(100, 187)))
    assert core.dispatch(req, now=0.3) == "w1"
    core.table.mark_dead("w0")  # between the choice and the forward
    assert core.pull_for(req) is None  # the request goes as a plain Dispatch
