"""The engine's prefix cache: the hash chain, the block manager's cached and evictable
blocks (eviction order, the pools' invariant under random operations), and the engine
skipping the prefill of a cached prefix while producing exactly the tokens it produces
with the cache off (TokenKVExecutor's tokens depend on the KV it reads back, so a wrong
or stale cached block changes them)."""

from __future__ import annotations

import random

import pytest

from ferry.common.config import EngineConfig
from ferry.common.prefix_hash import block_hashes, seed_hash
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.block_manager import BlockManager, OutOfBlocks
from ferry.services.worker.engine.engine import Engine
from tests.unit.fakes import TokenKVExecutor

SEED = seed_hash("test-model")


# ---- the hash chain -------------------------------------------------------------------------


def test_hashes_chain_over_the_whole_prefix():
    a = block_hashes(list(range(12)), 4, parent=SEED)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_hashes(list(range(13)), 4, parent=SEED) == a  # a partial block has none
    b = block_hashes([*range(8), 99, 9, 10, 11], 4, parent=SEED)
    assert b[:2] == a[:2] and b[2] != a[2]  # differ from the first block that differs
    c = block_hashes([99, *range(1, 12)], 4, parent=SEED)
    assert not set(c) & set(a)  # an early difference changes every later hash
    assert block_hashes(list(range(12)), 4, parent=seed_hash("other-model"))[0] != a[0]
    # continuing a chain from its last hash gives the same hashes as hashing it whole
    assert block_hashes(list(range(4, 12)), 4, parent=a[0]) == a[1:]


def test_the_chain_is_pinned_to_its_definition():
    """Gateways, the scheduler and workers (other processes, other hosts, other Python
    versions) must compute the same hashes: pin the definition and one value."""
    import hashlib
    import struct

    tokens = struct.pack("<4i", 5, 6, 7, 8)
    expected = int.from_bytes(
        hashlib.blake2b(struct.pack("<Q", 42) + tokens, digest_size=8).digest(), "little")
    assert block_hashes([5, 6, 7, 8], 4, parent=42) == [expected]
    assert seed_hash("llama") == int.from_bytes(
        hashlib.blake2b(b"llama", digest_size=8).digest(), "little")


# ---- the block manager ----------------------------------------------------------------------


def test_freed_cached_blocks_stay_findable_until_evicted_oldest_first():
    bm = BlockManager(4, 2)
    a, b = bm.allocate(2)
    bm.register(a, 111)
    bm.register(b, 222)
    assert bm.match([111, 222, 333]) == [a, b] and bm.match([222]) == [b]
    bm.free([b])
    bm.free([a])  # freed after b: evicted after b
    assert bm.num_free == 2 and bm.num_evictable == 2 and bm.num_available == 4
    bm.check()
    c, d = bm.allocate(2)  # the truly free ones first
    assert {c, d}.isdisjoint({a, b}) and bm.match([111, 222]) == [a, b]
    (e,) = bm.allocate(1)  # then the least recently freed cached block: b
    assert e == b and bm.match([111, 222]) == [a] and bm.match([222]) == []
    assert bm.take_events() == ([111], [222])  # net: 222 was cached, then evicted
    assert bm.take_events() == ([], [])
    assert bm.cached_hashes() == [111]
    bm.claim([a])  # a hit on an evictable block makes it used again
    assert bm.num_evictable == 0 and bm.num_used == 4
    with pytest.raises(OutOfBlocks):
        bm.allocate(1)
    bm.check()


def test_a_second_block_with_the_same_prefix_is_not_cached_twice():
    bm = BlockManager(4, 2)
    a, b = bm.allocate(2)
    bm.register(a, 7)
    bm.register(b, 7)  # computed the same prefix at the same time: b stays private
    bm.free([a, b])
    assert bm.num_evictable == 1 and bm.num_free == 3 and bm.match([7]) == [a]
    bm.check()


def test_the_pools_add_up_under_random_operations():
    rng = random.Random(0)
    bm = BlockManager(32, 4)
    tables: list[list[int]] = []
    reservations = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 and bm.can_allocate(n := rng.randint(1, 4)):
            tables.append(bm.allocate(n))
            for block_id in tables[-1]:
                if rng.random() < 0.7:
                    bm.register(block_id, rng.randint(0, 40))
        elif op < 0.55 and tables:
            bm.free(tables.pop(rng.randrange(len(tables))))
        elif op < 0.75:
            found = bm.match([rng.randint(0, 40) for _ in range(rng.randint(1, 3))])
            if found:
                bm.claim(found)
                tables.append(found)
        elif op < 0.85 and bm.reserve(f"m{reservations}", rng.randint(1, 3)):
            reservations += 1
        elif op < 0.95 and reservations:
            key = f"m{rng.randrange(reservations)}"
            held = len(bm.reserved(key))
            if held and rng.random() < 0.5:
                tables.append(bm.take_reserved(key, rng.randint(0, held)))
            else:
                bm.release_reservation(key)
        bm.check()
    for table in tables:
        bm.free(table)
    for i in range(reservations):
        bm.release_reservation(f"m{i}")
    bm.check()
    assert bm.num_used == 0 and bm.num_available == bm.num_total


# ---- the engine -----------------------------------------------------------------------------


def engine(*, cache: bool, num_blocks: int = 64, budget: int = 64) -> Engine:
    return Engine(TokenKVExecutor(num_blocks=num_blocks, block_size=4),
                  EngineConfig(max_num_batched_tokens=budget, enable_prefix_cache=cache),
                  model_identity="fake")


class Counting:
    """Counts the prompt tokens the executor computes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.num_tokens = 0
        execute = engine.executor.execute

        def counted(batch):
            self.num_tokens += sum(len(c.token_ids) for c in batch.chunks)
            return execute(batch)

        engine.executor.execute = counted


def run_all(engine: Engine) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.req_id, []).extend(out.token_ids)
        engine.check_invariants()
    return outputs


SYSTEM = list(range(10, 50))  # a 40-token shared prefix (10 blocks)


def multi_turn_workload(engine: Engine, counting: Counting) -> dict[str, list[int]]:
    """A system prompt shared by 3 users, then a second turn that extends the first."""
    params = SamplingParams(max_tokens=9, temperature=0.0)
    outputs = {}
    for user in range(3):
        engine.add_request(f"u{user}", SYSTEM + [60 + user] * 5, params)
    outputs.update(run_all(engine))
    turn2 = SYSTEM + [60] * 5 + outputs["u0"] + [70, 71, 72]
    engine.add_request("u0-turn2", turn2, params)
    outputs.update(run_all(engine))
    return outputs


def test_cached_prefixes_are_not_computed_again_and_outputs_are_identical():
    on, off = engine(cache=True), engine(cache=False)
    count_on, count_off = Counting(on), Counting(off)
    assert multi_turn_workload(on, count_on) == multi_turn_workload(off, count_off)
    # u1 is admitted in u0's first step, before u0's blocks are cached: no hit. u2, a
    # step later, skips the 40-token system prompt; turn 2 finds turn 1 in the cache,
    # prompt and outputs: its 13 full computed blocks (52 tokens)
    saved = 40 + 52
    assert count_off.num_tokens - count_on.num_tokens == saved
    load = on.load()
    assert load.num_prefix_hit_tokens == saved
    assert load.num_prompt_tokens == 3 * 45 + len(SYSTEM) + 5 + 9 + 3
    assert load.num_cached_blocks > 0 and load.num_free_blocks == on.blocks.num_total
    assert off.load().num_prefix_hit_tokens == 0 and off.blocks.num_evictable == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    on = engine(cache=True)
    counting = Counting(on)
    prompt = list(range(1, 17))  # 4 full blocks
    params = SamplingParams(max_tokens=3, temperature=0.0)
    on.add_request("a", prompt, params)
    first = run_all(on)["a"]
    before = counting.num_tokens
    on.add_request("b", prompt, params)
    assert run_all(on)["b"] == first
    # 3 blocks from the cache; the last block is computed again, privately
    assert counting.num_tokens - before == 4 + 2


def test_eviction_under_pressure_keeps_outputs_right():
    """A small cache: hits, evictions and preemptions interleave; tokens never change."""
    rng = random.Random(1)
    prompts = [SYSTEM[: rng.randint(4, 40)] + [rng.randint(1, 90) for _ in range(rng.randint(1, 12))]
               for _ in range(24)]
    params = [SamplingParams(max_tokens=rng.randint(1, 20), temperature=0.0) for _ in prompts]

    def run(cache: bool) -> dict[str, list[int]]:
        e = engine(cache=cache, num_blocks=24, budget=32)
        for i, (p, s) in enumerate(zip(prompts, params, strict=True)):
            e.add_request(f"r{i}", p, s)
        out = run_all(e)
        assert e.blocks.num_used == 0
        return out

    assert run(True) == run(False)


def test_a_finished_requests_prefix_is_evicted_tail_first():
    """Its blocks are freed last first: memory pressure cuts the chain at its tail, so the
    head (what most requests share) stays findable."""
    on = engine(cache=True, num_blocks=24)
    on.add_request("a", SYSTEM + [1, 2], SamplingParams(max_tokens=2, temperature=0.0))
    run_all(on)
    hashes = block_hashes(SYSTEM, 4, parent=on.scheduler.prefix_seed)
    assert len(on.blocks.match(hashes)) == 10
    on.blocks.reserve("pressure", on.blocks.num_free + 3)  # evicts 3 cached blocks
    assert len(on.blocks.match(hashes)) == 10 - 3  # the last 3 of the chain, not the first
    on.blocks.release_reservation("pressure")
    on.check_invariants()


# ---- cached prompt tokens, as usage reports them ---------------------------------------------


def first_outputs(engine: Engine) -> dict[str, int | None]:
    """Run to the end; req_id -> num_cached_prompt_tokens of its output at index 0 (every
    other output must carry None)."""
    reported = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.first_index == 0:
                reported.setdefault(out.req_id, out.num_cached_prompt_tokens)
            else:
                assert out.num_cached_prompt_tokens is None
        engine.check_invariants()
    return reported


def first_outputs_of_one_step(engine: Engine) -> dict[str, int | None]:
    return {out.req_id: out.num_cached_prompt_tokens for out in engine.step()
            if out.first_index == 0}


def test_the_first_output_reports_the_prompt_tokens_found_cached():
    on, off = engine(cache=True), engine(cache=False)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    for e in (on, off):
        e.add_request("fresh", SYSTEM + [1, 2], params)
        first_outputs(e)  # 10 full blocks computed, cached when on
        e.add_request("shares", SYSTEM + [3, 4, 5], params)
        e.add_request("whole", SYSTEM, params)
    assert first_outputs(on) == {"shares": 40, "whole": 36}  # whole computes its last block
    assert first_outputs(off) == {"shares": 0, "whole": 0}
    e = engine(cache=True)
    e.add_request("fresh", SYSTEM + [1, 2], params)
    assert first_outputs(e) == {"fresh": 0}


def test_a_preempted_request_keeps_its_first_admissions_count():
    """Recomputed after a preemption it finds its own freed blocks cached: a hit for the
    engine's counters, not for its usage (its prompt was computed once, here)."""
    e = engine(cache=True, num_blocks=14)
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0)
    e.add_request("low", list(range(1, 10)), params, priority=0, arrival_s=0.0)
    low = e.get("low")
    assert first_outputs_of_one_step(e) == {"low": 0}
    e.add_request("high", list(range(11, 20)), params, priority=1, arrival_s=1.0)
    first_outputs(e)
    assert low.num_preemptions > 0 and e.scheduler.num_hit_tokens > 0
    assert low.num_cached_prompt_tokens == 0


def test_a_request_migrated_before_its_first_output_carries_its_count():
    """Paused mid-prefill (no output yet): the destination reports the source's count; once
    an output was delivered, the gateway has it and the state carries none."""
    src, dst = engine(cache=True, budget=8), engine(cache=False)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    src.add_request("a", SYSTEM + [1, 2], params)
    first_outputs(src)
    src.add_request("b", SYSTEM + [5] * 20, params)
    src.step()  # b: 40 tokens from the cache, then 8 of its 20 others computed
    req = src.pause("b")
    state = src.export_state("b")
    assert (state.num_delivered, state.num_computed_tokens) == (0, 48)
    assert state.num_cached_prompt_tokens == 40
    num_blocks = src.blocks.blocks_for(state.num_computed_tokens)
    assert dst.blocks.reserve("m", num_blocks)
    dst_blocks = dst.blocks.take_reserved("m", num_blocks)
    dst.executor.kv_cache[dst_blocks] = src.executor.kv_cache[req.block_ids[:num_blocks]]
    src.remove("b")
    dst.import_request(state, req.prompt_token_ids, dst_blocks)
    assert first_outputs_of_one_step(dst) == {"b": 40}  # its prompt's last 12 tokens
    assert dst.export_state("b").num_cached_prompt_tokens is None  # delivered: told
