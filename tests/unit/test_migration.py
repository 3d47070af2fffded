"""Live migration and prefix pulls between in-process engines (real gloo KV groups, real
codec, no sockets): token continuity and every race of DESIGN §6, with both block pools
whole after each."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ferry.common import wire
from ferry.common.config import EngineConfig
from ferry.common.prefix_hash import block_hashes
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.engine import Engine
from tests.unit.fakes import SamplerKVExecutor
from tests.unit.migration_harness import (
    Gateway,
    Network,
    Node,
    greedy,
    migrate,
    reference_tokens,
    seeded,
    wait_done,
    wait_pull,
    wait_until,
)

PROMPTS = {f"r{i}": list(range(3 + i, 3 + i + n)) for i, n in enumerate((9, 23, 14, 31))}


@contextlib.asynccontextmanager
async def cluster(num_nodes=2, *, num_blocks=128, budget=16, **worker_kw):
    net = Network()
    gateway = Gateway()
    nodes = [Node(net, f"w{i}", num_blocks=num_blocks, budget=budget, **worker_kw)
             for i in range(num_nodes)]
    for node in nodes:
        node.on_output = gateway.on_output
    tasks = [asyncio.create_task(node.step_loop()) for node in nodes]
    try:
        yield net, gateway, nodes
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for node in nodes:
            await node.pulls.close()
            await node.coordinator.close()
    for node in nodes:
        node.engine.check_invariants()
        assert node.engine.blocks.num_reserved == 0, f"{node.name} leaked a reservation"
        assert not node.engine.has_unfinished(), f"{node.name} still holds requests"


def add(node: Node, req_id: str, sampling, prompt=None):
    node.engine.add_request(req_id, prompt or PROMPTS[req_id], sampling, reply_addr="inproc://gw")


def assert_pools_whole(*nodes: Node) -> None:
    for node in nodes:
        node.engine.check_invariants()
        assert node.engine.blocks.num_reserved == 0
        assert node.engine.blocks.num_available == node.engine.blocks.num_total, node.name


async def finish_all(gateway: Gateway, req_ids, timeout_s=20.0):
    await wait_until(lambda: all(r in gateway.finished for r in req_ids), timeout_s)


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("make_sampling", [lambda: greedy(60), lambda: seeded(60, 77)],
                         ids=["greedy", "seeded"])
def test_migrated_mid_decode_yields_the_same_tokens(make_sampling):
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            for req_id in PROMPTS:
                add(a, req_id, make_sampling())
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 5)
            done = await wait_done(net, migrate(net, a, b, "r3"))
            assert done.committed, done.reason
            assert done.kv_verified  # the destination's KV sums to the source's
            assert done.num_blocks > 0 and done.num_bytes == done.num_blocks * 4 * 8
            assert b.engine.get("r3") is not None or "r3" in gateway.finished
            await finish_all(gateway, PROMPTS)
            for req_id, prompt in PROMPTS.items():
                assert gateway.tokens[req_id] == reference_tokens(prompt, make_sampling())
            assert_pools_whole(a, b)

    run(body())


def _penalized(max_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=seed, presence_penalty=1.5,
                          frequency_penalty=0.7, repetition_penalty=1.6, min_tokens=20,
                          stop_token_ids=(5,), logit_bias_token_ids=(6, 7),
                          logit_bias_values=(3.0, -2.0), min_p=0.02, logprobs=2)


def _reference(prompt: list[int], sampling: SamplingParams,
               output_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list]:
    """Tokens and logprobs of an undisturbed run (or of a replay from output_token_ids)."""
    engine = Engine(SamplerKVExecutor(num_blocks=512, block_size=4),
                    EngineConfig(max_num_batched_tokens=4096))
    engine.add_request("ref", prompt, sampling, output_token_ids=output_token_ids)
    tokens, logprobs = list(output_token_ids), [None] * len(output_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
            logprobs += out.logprobs
    return tokens, logprobs


def test_penalty_state_is_the_same_after_migration_and_replay():
    """Penalties, min_tokens, bias and logprobs come from the request's tokens, which
    travel with it: migrated back and forth, or replayed from its delivered tokens, it
    samples exactly what an undisturbed run samples."""
    async def body():
        async with cluster(executor=SamplerKVExecutor) as (net, gateway, (a, b)):
            for req_id in PROMPTS:
                add(a, req_id, _penalized(60, seed=int(req_id[1:])))
            src, dst = a, b
            for at in (5, 15, 30):
                await wait_until(lambda n=at: len(gateway.tokens.get("r3", [])) >= n)
                done = await wait_done(net, migrate(net, src, dst, "r3"))
                assert done.committed, done.reason
                src, dst = dst, src
            await finish_all(gateway, PROMPTS)
        for req_id, prompt in PROMPTS.items():
            sampling = _penalized(60, seed=int(req_id[1:]))
            tokens, logprobs = _reference(prompt, sampling)
            assert gateway.tokens[req_id] == tokens, req_id
            assert gateway.logprobs[req_id] == logprobs, req_id
            assert len(tokens) == 60 or len(tokens) > 20  # min_tokens held stops back
            replayed, _ = _reference(prompt, sampling, output_token_ids=tuple(tokens[:17]))
            assert replayed == tokens, req_id
        plain = _reference(PROMPTS["r3"], SamplingParams(max_tokens=60, temperature=0.9, seed=3,
                                                          ignore_eos=True))[0]
        assert plain != gateway.tokens["r3"]  # the penalties did change the draw

    run(body())


def test_back_and_forth_many_times():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "r1", greedy(120))
            add(a, "r0", greedy(120))
            src, dst = a, b
            for _ in range(6):
                await wait_until(lambda s=src: s.engine.get("r1") is not None
                                 and s.engine.get("r1").num_output_tokens > 0)
                done = await wait_done(net, migrate(net, src, dst, "r1"))
                assert done.committed, done.reason
                src, dst = dst, src
            await finish_all(gateway, ["r0", "r1"])
            assert gateway.tokens["r1"] == reference_tokens(PROMPTS["r1"], greedy(120))
            assert gateway.tokens["r0"] == reference_tokens(PROMPTS["r0"], greedy(120))
            assert_pools_whole(a, b)

    run(body())


def test_multi_stage_copy_while_decoding():
    async def body():
        async with cluster(migration_stage_limit=6, migration_last_stage_blocks=0) as (
                net, gateway, (a, b)):
            a.step_delay_s = 0.004
            add(a, "r3", greedy(200))
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 20)
            net.delay_s = 0.003  # slow control plane: decoding fills blocks between stages
            done = await wait_done(net, migrate(net, a, b, "r3"))
            net.delay_s = 0.0
            assert done.committed, done.reason
            assert done.num_stages >= 2
            await finish_all(gateway, ["r3"])
            assert gateway.tokens["r3"] == reference_tokens(PROMPTS["r3"], greedy(200))
            assert_pools_whole(a, b)

    run(body())


def test_queued_request_migrates_without_kv():
    async def body():
        async with cluster(num_blocks=12, budget=64) as (net, gateway, (a, b)):
            add(a, "r3", greedy(10))
            await wait_until(lambda: a.engine.get("r3").num_output_tokens > 0)
            a.paused_steps = True  # freeze a so r0 stays queued
            add(a, "r0", greedy(10))
            waiting = [r.req_id for r in a.engine.scheduler.waiting]
            assert "r0" in waiting
            done = await wait_done(net, migrate(net, a, b, None))
            assert done.committed and done.req_id == "r0" and done.num_blocks == 0
            a.paused_steps = False
            await finish_all(gateway, ["r0", "r3"])
            assert gateway.tokens["r0"] == reference_tokens(PROMPTS["r0"], greedy(10))
            assert_pools_whole(a, b)

    run(body())


def test_request_finishes_during_migration():
    async def body():
        async with cluster(migration_stage_limit=50, migration_last_stage_blocks=0) as (
                net, gateway, (a, b)):
            add(a, "r1", greedy(12))
            await wait_until(lambda: len(gateway.tokens.get("r1", [])) >= 2)
            net.delay_s = 0.02  # every control message is slow: r1 ends first
            done = await wait_done(net, migrate(net, a, b, "r1"))
            net.delay_s = 0.0
            assert not done.committed
            assert "finished" in done.reason or "not running" in done.reason
            await finish_all(gateway, ["r1"])
            assert gateway.tokens["r1"] == reference_tokens(PROMPTS["r1"], greedy(12))
            await wait_until(lambda: b.engine.blocks.num_reserved == 0)
            assert_pools_whole(a, b)

    run(body())


def test_destination_without_memory_refuses_and_request_goes_on():
    async def body():
        async with cluster(num_blocks=16) as (net, gateway, (a, b)):
            add(b, "r3", greedy(30))  # fills b
            await wait_until(lambda: b.engine.get("r3").num_output_tokens > 0)
            add(a, "r2", greedy(30))
            await wait_until(lambda: a.engine.get("r2").num_output_tokens > 0)
            done = await wait_done(net, migrate(net, a, b, "r2"))
            assert not done.committed and "no memory" in done.reason
            await finish_all(gateway, ["r2", "r3"])
            assert gateway.tokens["r2"] == reference_tokens(PROMPTS["r2"], greedy(30))
            assert_pools_whole(a, b)

    run(body())


def test_preempted_during_migration_aborts_cleanly():
    async def body():
        async with cluster(num_blocks=24, budget=64, migration_stage_limit=200,
                           migration_last_stage_blocks=0) as (net, gateway, (a, b)):
            add(a, "r0", greedy(60))
            add(a, "r1", greedy(60))  # arrives last: the one preempted when blocks run out
            await wait_until(lambda: len(gateway.tokens.get("r1", [])) >= 3)
            net.delay_s = 0.01  # slow stages: both requests outgrow the pool meanwhile
            done = await wait_done(net, migrate(net, a, b, "r1"))
            net.delay_s = 0.0
            assert not done.committed and "preempted" in done.reason, done.reason
            assert a.engine.scheduler.num_preemptions > 0
            await finish_all(gateway, ["r0", "r1"])
            assert gateway.tokens["r0"] == reference_tokens(PROMPTS["r0"], greedy(60))
            assert gateway.tokens["r1"] == reference_tokens(PROMPTS["r1"], greedy(60))
            await wait_until(lambda: b.engine.blocks.num_reserved == 0)
            assert_pools_whole(a, b)

    run(body())


def test_client_abort_during_migration():
    async def body():
        async with cluster(migration_stage_limit=50, migration_last_stage_blocks=0) as (
                net, gateway, (a, b)):
            add(a, "r3", greedy(100))
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 3)
            net.delay_s = 0.01
            migration_id = migrate(net, a, b, "r3")
            await asyncio.sleep(0.015)
            a.deliver(wire.Abort(req_id="r3", reason="client"))
            done = await wait_done(net, migration_id)
            net.delay_s = 0.0
            assert not done.committed
            assert gateway.finished["r3"] == "abort"
            await wait_until(lambda: b.engine.blocks.num_reserved == 0
                             and not b.engine.has_unfinished())
            assert_pools_whole(a, b)

    run(body())


def test_abort_after_commit_is_forwarded_to_the_new_holder():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "r3", greedy(400))
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 3)
            done = await wait_done(net, migrate(net, a, b, "r3"))
            assert done.committed
            a.deliver(wire.Abort(req_id="r3", reason="client"))  # stale placement
            await wait_until(lambda: gateway.finished.get("r3") == "abort")
            assert_pools_whole(a, b)

    run(body())


def test_dead_destination_times_out_and_request_goes_on():
    async def body():
        async with cluster(migration_timeout_s=0.3) as (net, gateway, (a, b)):
            add(a, "r2", greedy(80))
            await wait_until(lambda: len(gateway.tokens.get("r2", [])) >= 3)
            net.dropping[b.addr] = (wire.MigPrealloc,)  # b never hears of it
            done = await wait_done(net, migrate(net, a, b, "r2"))
            assert not done.committed and "timeout" in done.reason
            net.dropping.clear()
            await finish_all(gateway, ["r2"])
            assert gateway.tokens["r2"] == reference_tokens(PROMPTS["r2"], greedy(80))
            assert_pools_whole(a, b)

    run(body())


def test_destination_stalls_mid_transfer():
    async def body():
        async with cluster(migration_timeout_s=0.5, migration_stage_limit=50,
                           migration_last_stage_blocks=0) as (net, gateway, (a, b)):
            add(a, "r3", greedy(150))
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 3)
            net.dropping[b.addr] = (wire.MigStage,)  # b never posts the receives
            done = await wait_done(net, migrate(net, a, b, "r3"), timeout_s=15)
            assert not done.committed
            net.dropping.clear()
            await finish_all(gateway, ["r3"])
            assert gateway.tokens["r3"] == reference_tokens(PROMPTS["r3"], greedy(150))
            await wait_until(lambda: b.engine.blocks.num_reserved == 0)
            assert_pools_whole(a, b)
            # the broken group is rebuilt: a later migration works
            add(a, "r0", greedy(150))
            await wait_until(lambda: len(gateway.tokens.get("r0", [])) >= 3)
            done = await wait_done(net, migrate(net, a, b, "r0"))
            assert done.committed, done.reason
            await finish_all(gateway, ["r0"])
            assert gateway.tokens["r0"] == reference_tokens(PROMPTS["r0"], greedy(150))

    run(body())


def test_commit_ack_lost_resumes_source_without_duplicate_indices():
    async def body():
        async with cluster(migration_timeout_s=0.4) as (net, gateway, (a, b)):
            add(a, "r1", greedy(120))
            await wait_until(lambda: len(gateway.tokens.get("r1", [])) >= 3)
            net.dropping[a.addr] = (wire.MigCommitAck,)
            done = await wait_done(net, migrate(net, a, b, "r1"))
            assert not done.committed
            net.dropping.clear()
            await finish_all(gateway, ["r1"])
            assert gateway.tokens["r1"] == reference_tokens(PROMPTS["r1"], greedy(120))
            # Both copies may have run for a while; the gateway kept each index once.
            await wait_until(lambda: not a.engine.has_unfinished()
                             and not b.engine.has_unfinished())
            assert_pools_whole(a, b)

    run(body())


def test_concurrent_migrations_into_one_instance_and_bound():
    async def body():
        async with cluster(num_nodes=4, max_migrations=2) as (net, gateway, nodes):
            dst, sources = nodes[0], nodes[1:]
            for src, req_id in zip(sources, ["r1", "r2", "r3"], strict=True):
                add(src, req_id, greedy(100))
            await wait_until(lambda: all(len(gateway.tokens.get(r, [])) >= 3
                                         for r in ["r1", "r2", "r3"]))
            ids = [migrate(net, src, dst, r) for src, r in zip(sources, ["r1", "r2", "r3"],
                                                               strict=True)]
            results = [await wait_done(net, m) for m in ids]
            committed = [d for d in results if d.committed]
            refused = [d for d in results if not d.committed]
            assert len(committed) >= 2
            assert all("too many" in d.reason for d in refused)
            await finish_all(gateway, ["r1", "r2", "r3"])
            for r in ["r1", "r2", "r3"]:
                assert gateway.tokens[r] == reference_tokens(PROMPTS[r], greedy(100))
            assert_pools_whole(*nodes)

    run(body())


def test_refusals_are_reported():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            done = await wait_done(net, migrate(net, a, b, None))
            assert not done.committed and done.reason == "no request to migrate"
            done = await wait_done(net, migrate(net, a, b, "nope"))
            assert not done.committed and "not on this instance" in done.reason
            done = await wait_done(net, migrate(net, a, a, None))
            assert not done.committed and "this instance" in done.reason

    run(body())


def test_stop_and_copy_sends_everything_in_one_paused_stage():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "r3", greedy(120))
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 30)
            migration_id = "stop-and-copy"
            a.deliver(wire.MigrateOut(migration_id=migration_id, dst_instance_id=b.name,
                                      dst_inbox_addr=b.addr, req_id="r3", max_stages=0))
            done = await wait_done(net, migration_id)
            assert done.committed and done.num_stages == 1
            assert done.first_stage_bytes == done.num_bytes > 0
            # downtime: the end of r3's last step on a to the end of its first on b
            assert 0 < done.downtime_s < done.total_s
            await finish_all(gateway, ["r3"])
            assert gateway.tokens["r3"] == reference_tokens(PROMPTS["r3"], greedy(120))
            assert_pools_whole(a, b)

    run(body())


def test_corrupted_kv_is_caught_by_the_checksum_and_the_request_goes_on():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "r3", greedy(150))
            await wait_until(lambda: len(gateway.tokens.get("r3", [])) >= 10)
            real_recv = b.coordinator.kv.recv

            async def corrupting_recv(group_id, block_ids):
                num_bytes = await real_recv(group_id, block_ids)
                b.engine.executor.kv_cache[block_ids[0], 0] += 1  # one slot off
                return num_bytes

            b.coordinator.kv.recv = corrupting_recv
            done = await wait_done(net, migrate(net, a, b, "r3"))
            assert not done.committed and "checksum" in done.reason
            await finish_all(gateway, ["r3"])
            assert gateway.tokens["r3"] == reference_tokens(PROMPTS["r3"], greedy(150))
            await wait_until(lambda: b.engine.blocks.num_reserved == 0)
            assert_pools_whole(a, b)

    run(body())


# ---- dedup: the destination caches part of the request's prefix ---------------------------

SHARED = list(range(40, 80))  # 40 tokens: 10 full blocks of 4


@pytest.mark.parametrize("warm_running", [False, True], ids=["cached-idle", "cached-in-use"])
@pytest.mark.parametrize("make_sampling", [lambda: greedy(60), lambda: seeded(60, 5)],
                         ids=["greedy", "seeded"])
def test_migration_skips_the_blocks_the_destination_caches(make_sampling, warm_running):
    """b computed SHARED for another request (finished: its blocks idle in the cache; or
    still running: shared, in use); a request with that prefix moves from a to b: only
    the blocks past the prefix are copied, b's table starts with its own cached blocks,
    and the tokens are exactly an undisturbed run's (and the checksum over the whole
    table, cached blocks included, matches the source's)."""
    prompt = SHARED + [7, 8, 9, 10, 11, 12]

    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(b, "warm", greedy(200 if warm_running else 3), SHARED + [3, 1])
            await wait_until(lambda: len(gateway.tokens.get("warm", [])) >= 2)
            if not warm_running:
                await finish_all(gateway, ["warm"])
            add(a, "r", make_sampling(), prompt)
            await wait_until(lambda: len(gateway.tokens.get("r", [])) >= 5)
            done = await wait_done(net, migrate(net, a, b, "r"))
            assert done.committed, done.reason
            assert done.kv_verified
            assert done.num_blocks_skipped == len(SHARED) // 4
            assert done.num_bytes == done.num_blocks * 4 * 8
            if warm_running:
                req = b.engine.get("r")
                warm = b.engine.get("warm")
                if req is not None and warm is not None:  # one table, shared blocks
                    assert req.block_ids[:10] == warm.block_ids[:10]
            await finish_all(gateway, ["r", "warm"])
            assert gateway.tokens["r"] == reference_tokens(prompt, make_sampling())
            # what b received is cached there now: the whole prompt's full blocks
            full = block_hashes(prompt, 4, parent=b.engine.scheduler.prefix_seed)
            assert len(b.engine.blocks.match(full)) == len(full)
            assert_pools_whole(a, b)

    run(body())


def test_aborted_dedup_migration_gives_the_claimed_blocks_back():
    """b claims its cached prefix blocks for an incoming request, then the transfer stalls
    and times out: the claims are dropped (the blocks idle in b's cache again, findable),
    the request goes on at a, and every pool is whole."""
    prompt = SHARED + [7, 8, 9, 10, 11, 12]

    async def body():
        async with cluster(migration_timeout_s=0.4, migration_stage_limit=50,
                           migration_last_stage_blocks=0) as (net, gateway, (a, b)):
            add(b, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            cached = b.engine.blocks.num_evictable
            add(a, "r", greedy(150), prompt)
            await wait_until(lambda: len(gateway.tokens.get("r", [])) >= 10)
            net.dropping[b.addr] = (wire.MigStage,)
            migration_id = migrate(net, a, b, "r")
            await wait_until(lambda: b.engine.blocks.num_evictable < cached)  # claimed
            done = await wait_done(net, migration_id, timeout_s=15)
            assert not done.committed
            net.dropping.clear()
            await wait_until(lambda: b.engine.blocks.num_evictable == cached
                             and b.engine.blocks.num_reserved == 0)
            full = block_hashes(SHARED, 4, parent=b.engine.scheduler.prefix_seed)
            assert len(b.engine.blocks.match(full)) == len(full)
            await finish_all(gateway, ["r"])
            assert gateway.tokens["r"] == reference_tokens(prompt, greedy(150))
            assert_pools_whole(a, b)

    run(body())


def test_destination_without_memory_for_the_rest_unclaims_its_cached_blocks():
    prompt = SHARED + [(i * 7) % 90 + 1 for i in range(36)]

    async def body():
        async with cluster(num_blocks=32) as (net, gateway, (a, b)):
            add(b, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            cached = b.engine.blocks.num_evictable
            assert b.engine.blocks.reserve("hog", b.engine.blocks.num_free)  # b is full
            add(a, "r", greedy(40), prompt)
            await wait_until(lambda: len(gateway.tokens.get("r", [])) >= 2)
            done = await wait_done(net, migrate(net, a, b, "r"))
            assert not done.committed and "no memory" in done.reason, done.reason
            assert "10 cached" in done.reason
            assert b.engine.blocks.num_evictable == cached  # the claims were dropped
            full = block_hashes(SHARED, 4, parent=b.engine.scheduler.prefix_seed)
            assert len(b.engine.blocks.match(full)) == len(full)
            b.engine.blocks.release_reservation("hog")
            await finish_all(gateway, ["r"])
            assert gateway.tokens["r"] == reference_tokens(prompt, greedy(40))
            assert_pools_whole(a, b)

    run(body())


# ---- prefix pulls: b copies a's cached prefix, then runs the request ------------------------

_pull_ids = iter(range(10**6))


def pull(net: Network, src: Node, dst: Node, req_id: str, prompt: list[int], sampling,
         num_blocks: int) -> str:
    """What the scheduler sends dst instead of the request's Dispatch."""
    pull_id = f"p{next(_pull_ids)}"
    hashes = block_hashes(prompt, 4, parent=src.engine.scheduler.prefix_seed)[:num_blocks]
    dispatch = wire.Dispatch.of(
        wire.DispatchBody(req_id=req_id, attempt=0, prompt_token_ids=tuple(prompt),
                          output_token_ids=(), sampling=sampling, arrival_s=0.0),
        priority=0, reply_addr="inproc://gw")
    net.send(dst.addr, wire.PullPrefix.carrying(dispatch, pull_id=pull_id,
                                                src_instance_id=src.name, src_inbox_addr=src.addr,
                                                block_hashes=tuple(hashes)))
    return pull_id


def cached_run(node: Node, prompt: list[int]) -> int:
    return len(node.engine.blocks.match(
        block_hashes(prompt, 4, parent=node.engine.scheduler.prefix_seed)))


PULLED = SHARED + [7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("src_running", [False, True], ids=["src-idle", "src-in-use"])
def test_pulled_prefix_is_exact_and_found_like_a_cache_hit(src_running):
    """a cached SHARED (its request finished, or still running on it); b pulls those 10
    blocks, registers them, and the request admitted there claims them instead of
    computing 40 tokens: its tokens are exactly an undisturbed run's."""
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "warm", greedy(200 if src_running else 3), SHARED + [3, 1])
            await wait_until(lambda: len(gateway.tokens.get("warm", [])) >= 2)
            if not src_running:
                await finish_all(gateway, ["warm"])
            hits_before = b.engine.load().num_prefix_hit_tokens
            done = await wait_pull(net, pull(net, a, b, "r", PULLED, greedy(30), 10))
            assert done.ok, done.reason
            assert (done.num_blocks, done.num_cached_blocks) == (10, 0)
            assert done.num_bytes == 10 * 4 * 8 and done.dst_instance_id == "w1"
            await finish_all(gateway, ["r", "warm"])
            assert gateway.tokens["r"] == reference_tokens(PULLED, greedy(30))
            assert b.engine.load().num_prefix_hit_tokens - hits_before == 40
            assert not a.pulls.outgoing  # a's pins are gone
            assert_pools_whole(a, b)

    run(body())


def test_pull_of_a_partly_evicted_prefix_copies_what_is_left():
    """a evicted the tail of the prefix meanwhile: it offers the 6 blocks it still has;
    b computes the other 4."""
    async def body():
        async with cluster(num_blocks=64) as (net, gateway, (a, b)):
            add(a, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            blocks = a.engine.blocks
            blocks.reserve("pressure", blocks.num_free + 5)  # the chain's last 5 go (of 11)
            blocks.release_reservation("pressure")
            assert cached_run(a, SHARED) == 6
            done = await wait_pull(net, pull(net, a, b, "r", PULLED, greedy(30), 10))
            assert done.ok and done.num_blocks == 6
            await finish_all(gateway, ["r"])
            assert gateway.tokens["r"] == reference_tokens(PULLED, greedy(30))
            assert b.engine.load().num_prefix_hit_tokens == 24
            assert_pools_whole(a, b)

    run(body())


def test_pull_from_a_source_that_evicted_everything_runs_the_request_anyway():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            blocks = a.engine.blocks
            blocks.reserve("pressure", blocks.num_available)  # every cached block goes
            blocks.release_reservation("pressure")
            done = await wait_pull(net, pull(net, a, b, "r", PULLED, greedy(30), 10))
            assert not done.ok and "evicted" in done.reason, done.reason
            await finish_all(gateway, ["r"])
            assert gateway.tokens["r"] == reference_tokens(PULLED, greedy(30))
            assert b.engine.load().num_prefix_hit_tokens == 0  # recomputed
            assert_pools_whole(a, b)

    run(body())


@pytest.mark.parametrize("lost", [wire.PrefixFetch, wire.PrefixAccept],
                         ids=["dead-before-offer", "dead-before-send"])
def test_pull_from_a_dead_source_times_out_and_the_request_runs(lost):
    async def body():
        async with cluster(prefix_pull_timeout_s=0.3) as (net, gateway, (a, b)):
            add(a, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            net.dropping[a.addr] = (lost,)  # a stops answering there
            done = await wait_pull(net, pull(net, a, b, "r", PULLED, greedy(30), 10))
            assert not done.ok and "timeout" in done.reason, done.reason
            net.dropping.clear()
            await finish_all(gateway, ["r"])
            assert gateway.tokens["r"] == reference_tokens(PULLED, greedy(30))
            await wait_until(lambda: not a.pulls.outgoing)  # a's pins time out too
            assert_pools_whole(a, b)

    run(body())


def test_pull_of_a_prefix_the_destination_caches_copies_nothing():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            for node in (a, b):
                add(node, f"warm-{node.name}", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm-w0", "warm-w1"])
            done = await wait_pull(net, pull(net, a, b, "r", PULLED, greedy(30), 10))
            assert done.ok and (done.num_blocks, done.num_cached_blocks) == (0, 10)
            await finish_all(gateway, ["r"])
            assert gateway.tokens["r"] == reference_tokens(PULLED, greedy(30))
            assert_pools_whole(a, b)

    run(body())


def test_request_aborted_during_its_pull_never_runs():
    async def body():
        async with cluster() as (net, gateway, (a, b)):
            add(a, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            net.delay_s = 0.02  # slow control plane: the abort lands mid-pull
            pull_id = pull(net, a, b, "r", PULLED, greedy(30), 10)
            await wait_until(lambda: b.pulls.waiting("r") is not None)
            b.pulls.cancel("r")
            done = await wait_pull(net, pull_id)
            net.delay_s = 0.0
            assert done.ok  # the copy went on, into b's cache
            assert b.engine.get("r") is None and "r" not in gateway.tokens
            assert cached_run(b, SHARED) == 10
            assert_pools_whole(a, b)

    run(body())


def test_pull_and_migration_over_one_kv_group_pair_up():
    """A migration a -> b and pulls a -> b at once share the a -> b group: sends and
    receives must pair up in order (each announced right before it is sent)."""
    async def body():
        async with cluster(migration_stage_limit=6, migration_last_stage_blocks=0) as (
                net, gateway, (a, b)):
            add(a, "warm", greedy(3), SHARED + [3, 1])
            await finish_all(gateway, ["warm"])
            add(a, "m", greedy(150), PROMPTS["r3"])
            await wait_until(lambda: len(gateway.tokens.get("m", [])) >= 20)
            migration_id = migrate(net, a, b, "m")
            pulls = [pull(net, a, b, f"q{i}", SHARED + [i + 1] * 3, greedy(20), 10)
                     for i in range(3)]
            done = await wait_done(net, migration_id)
            assert done.committed, done.reason
            outcomes = [await wait_pull(net, p) for p in pulls]
            assert any(o.ok and o.num_blocks == 10 for o in outcomes), outcomes
            await finish_all(gateway, ["m", "q0", "q1", "q2"])
            assert gateway.tokens["m"] == reference_tokens(PROMPTS["r3"], greedy(150))
            for i in range(3):
                assert gateway.tokens[f"q{i}"] == reference_tokens(SHARED + [i + 1] * 3,
                                                                   greedy(20))
            assert_pools_whole(a, b)

    run(body())
