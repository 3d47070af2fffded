"""The engine core with a token-KV fake executor: scheduling, chunking, preemption,
priorities, abort, the migration hooks; block invariant after every step."""

from __future__ import annotations

import random

import pytest

from ferry.common.config import EngineConfig
from ferry.common.sampling import SamplingParams
from ferry.services.worker import report
from ferry.services.worker.engine.batch import ModelBatch
from ferry.services.worker.engine.engine import Engine, RequestRejected
from ferry.services.worker.engine.request import Status
from tests.unit.fakes import TokenKVExecutor


def make_engine(num_blocks=64, block_size=4, budget=64, max_num_seqs=16, **kw):
    executor = TokenKVExecutor(num_blocks=num_blocks, block_size=block_size, **kw)
    config = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    return Engine(executor, config)


class Collector:
    """Gathers outputs, checking the in-order, exactly-once contract."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}

    def feed(self, outputs) -> None:
        for out in outputs:
            got = self.tokens.setdefault(out.req_id, [])
            assert out.first_index == len(got), "outputs must arrive in order, without gaps"
            assert out.req_id not in self.reasons, "output after finish"
            got.extend(out.token_ids)
            if out.finish_reason is not None:
                self.reasons[out.req_id] = out.finish_reason


def step(engine: Engine, collector: Collector, num_steps: int = 1) -> None:
    for _ in range(num_steps):
        collector.feed(engine.step())
        engine.check_invariants()


def run_all(engine: Engine, collector: Collector | None = None) -> dict[str, list[int]]:
    """Step to completion, checking invariants and the output contract."""
    collector = collector or Collector()
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        step(engine, collector)
    assert not engine.has_unfinished()
    assert engine.blocks.num_available == engine.blocks.num_total
    return collector.tokens


PROMPTS = [list(range(1, 1 + n)) for n in (3, 17, 9, 30, 1, 12)]


def add_all(engine, prompts=PROMPTS, max_tokens=12, **sampling):
    for i, p in enumerate(prompts):
        params = SamplingParams(**{"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, **sampling})
        engine.add_request(f"r{i}", p, params, arrival_s=float(i))


def reference(prompts=PROMPTS, max_tokens=12, **sampling):
    outs = {}
    for i, p in enumerate(prompts):
        engine = make_engine(num_blocks=256, budget=4096)
        params = SamplingParams(**{"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, **sampling})
        engine.add_request(f"r{i}", p, params)
        outs[f"r{i}"] = run_all(engine)[f"r{i}"]
    return outs


def test_batched_equals_one_at_a_time():
    engine = make_engine()
    add_all(engine)
    assert run_all(engine) == reference()


def test_chunked_prefill_splits_long_prompts_and_matches():
    engine = make_engine(budget=5)
    add_all(engine)
    outs = run_all(engine)
    assert outs == reference()
    assert max(engine.executor.batch_sizes) <= 5


def test_chunks_respect_the_token_budget():
    engine = make_engine(budget=8)
    add_all(engine)
    while engine.has_unfinished():
        plan = engine.schedule()
        assert 0 < plan.num_tokens <= 8
        sampled = engine.executor.execute(ModelBatch(chunks=tuple(plan.chunks)))
        engine.finish_step(plan, sampled, 0.0)
        engine.check_invariants()


def test_preemption_by_recompute_gives_identical_tokens():
    engine = make_engine(num_blocks=14, budget=64)
    add_all(engine, max_tokens=20)
    outs = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    assert outs == reference(max_tokens=20)


def test_seeded_sampling_same_alone_batched_and_preempted():
    sampling = dict(temperature=0.8, seed=1234)
    alone = reference(max_tokens=20, **sampling)
    engine = make_engine(num_blocks=14, budget=7)
    add_all(engine, max_tokens=20, **sampling)
    outs = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    assert outs == alone


def test_priority_runs_first_and_preempts_low_priority():
    engine = make_engine(num_blocks=10, budget=64, max_num_seqs=8)
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0)
    engine.add_request("low", list(range(1, 10)), params, priority=0, arrival_s=0.0)
    engine.step()
    engine.add_request("high", list(range(1, 10)), params, priority=1, arrival_s=1.0)
    finish_order = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason:
                finish_order.append(out.req_id)
        engine.check_invariants()
    assert finish_order == ["high", "low"]
    assert engine.requests == {}


def test_waiting_queue_orders_by_priority_then_arrival():
    engine = make_engine(budget=1000, max_num_seqs=1)
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    engine.add_request("a", [1, 2], params, priority=0, arrival_s=0.0)
    engine.add_request("b", [1, 2], params, priority=1, arrival_s=2.0)
    engine.add_request("c", [1, 2], params, priority=1, arrival_s=1.0)
    order = [out.req_id for _ in range(3) for out in engine.step()]
    assert order == ["c", "b", "a"]


def test_finish_reasons():
    engine = make_engine(eos_token_ids=(5,))
    sequence = reference(prompts=[[1, 2, 3]], max_tokens=40)["r0"]
    stop_token = sequence[3]
    engine.add_request("len", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.add_request("stop", [1, 2, 3], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=(stop_token,)))
    outs, reasons = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.req_id, []).extend(out.token_ids)
            if out.finish_reason:
                reasons[out.req_id] = out.finish_reason
    assert reasons == {"len": "length", "stop": "stop"}
    assert len(outs["len"]) == 4
    assert outs["stop"] == sequence[: sequence.index(stop_token) + 1]


def test_eos_stops_unless_ignored():
    sequence = reference(prompts=[[1, 2, 3]], max_tokens=40)["r0"]
    eos = sequence[2]
    for ignore, expected_len in ((False, sequence.index(eos) + 1), (True, 40)):
        engine = make_engine(eos_token_ids=(eos,))
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=ignore))
        assert len(run_all(engine)["r"]) == expected_len


def test_max_model_len_finishes_with_length():
    engine = make_engine(max_model_len=10)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert len(run_all(engine)["r"]) == 7


def test_rejects_bad_requests_with_clear_errors():
    engine = make_engine(num_blocks=4, max_model_len=64)
    ok = SamplingParams(max_tokens=4)
    cases = [
        ((), ok, 400, "empty"),
        ([1, 500], ok, 400, "vocabulary"),
        ([1], SamplingParams(max_tokens=4, logit_bias_token_ids=(500,), logit_bias_values=(1,)),
         400, "token id 500 is outside the vocabulary"),
        (list(range(1, 65)), ok, 400, "context"),
        (list(range(1, 30)), ok, 400, "KV cache"),
        ([1], SamplingParams(max_tokens=0), None, "max_tokens"),
    ]
    for prompt, params, code, message in cases:
        with pytest.raises((RequestRejected, ValueError), match=message) as err:
            engine.add_request("x", prompt, params)
        if code is not None:
            assert err.value.code == code
    engine.add_request("dup", [1], ok)
    with pytest.raises(RequestRejected, match="already exists"):
        engine.add_request("dup", [1], ok)
    engine.check_invariants()


def test_abort_anywhere_frees_everything():
    rng = random.Random(0)
    expected = reference(max_tokens=15)
    for _ in range(20):
        engine = make_engine(num_blocks=20, budget=6)
        add_all(engine, max_tokens=15)
        collector = Collector()
        step(engine, collector, rng.randrange(0, 8))
        victims = rng.sample(sorted(engine.requests), k=min(3, len(engine.requests)))
        for req_id in victims:
            out = engine.abort(req_id)
            assert out is not None and out.finish_reason == "abort"
            collector.feed([out])
            engine.check_invariants()
        assert engine.abort(victims[0]) is None
        outs = run_all(engine, collector)
        for req_id, tokens in outs.items():
            if req_id in victims:
                assert collector.reasons[req_id] == "abort"
                assert tokens == expected[req_id][: len(tokens)]
            else:
                assert tokens == expected[req_id]


def test_replayed_outputs_count_towards_max_tokens_and_continue_identically():
    full = reference(max_tokens=12)["r1"]
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add_request("r1", PROMPTS[1], params, output_token_ids=full[:5])
    outs = []
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            first = out.first_index if first is None else first
            outs.extend(out.token_ids)
    assert first == 5
    assert full[:5] + outs == full


def test_pause_export_import_moves_a_request_between_engines():
    """The migration hooks without a transport: copy KV rows by hand."""
    expected = reference(max_tokens=16)
    src, dst = make_engine(), make_engine()
    add_all(src, max_tokens=16)
    src_out, dst_out = Collector(), Collector()
    step(src, src_out, 6)
    moving = "r3"
    req = src.pause(moving)
    step(src, src_out)  # the others keep decoding while r3 is paused
    state = src.export_state(moving)
    assert state.num_computed_tokens > 0
    num_blocks = src.blocks.blocks_for(state.num_computed_tokens)
    assert dst.blocks.reserve("m", num_blocks)
    dst_blocks = dst.blocks.take_reserved("m", num_blocks)
    dst.executor.kv_cache[dst_blocks] = src.executor.kv_cache[req.block_ids[:num_blocks]]
    src.remove(moving)
    dst.import_request(state, req.prompt_token_ids, dst_blocks)
    src.check_invariants()
    dst.check_invariants()
    # The destination continues the stream at the next undelivered index.
    dst_out.tokens[moving] = list(src_out.tokens.get(moving, []))
    run_all(src, src_out)
    run_all(dst, dst_out)
    assert dst_out.tokens[moving] == expected[moving]
    for req_id in expected:
        if req_id != moving:
            assert src_out.tokens[req_id] == expected[req_id]


def test_pause_resume_keeps_running():
    expected = reference()
    engine = make_engine()
    add_all(engine)
    collector = Collector()
    step(engine, collector, 3)
    engine.pause("r0")
    assert engine.get("r0").status is Status.PAUSED
    step(engine, collector, 2)
    engine.resume("r0")
    assert run_all(engine, collector) == expected


def test_load_snapshot_counts():
    engine = make_engine(num_blocks=8, budget=64, max_num_seqs=1)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("a", [1] * 5, params, priority=1)
    engine.add_request("b", [1] * 9, params)
    engine.step()
    load = engine.load()
    assert load.num_running == 1 and load.num_waiting == 1
    assert load.head_demand_blocks == 3  # 9 prompt tokens + 1 -> 3 blocks of 4
    assert load.num_running_high == 1 and load.used_blocks_high == 2
    assert load.num_free_blocks + 2 == load.num_total_blocks


def test_register_and_load_report_as_a_worker_sends_them():
    """services/worker/report.py: the held list (engine, then pulls) about once a second,
    the cache events once, a snapshot when asked; the worker's counters in LoadFields."""
    engine = make_engine(num_blocks=8, budget=64)
    engine.add_request("a", [1] * 5, SamplingParams(max_tokens=4, ignore_eos=True), priority=1)
    reg = report.register(engine, instance_id="w0", inbox_addr="tcp://w0", kv_block_bytes=64,
                          pulling={"p": 0, "a": 0})
    assert (reg.req_ids, reg.req_priorities, reg.num_blocks) == (("a", "p"), (1, 0), 8)

    def one(seq, **kw):
        return report.load_report(engine, instance_id="w0", inbox_addr="tcp://w0", seq=seq,
                                  report_interval_s=0.5, num_dispatch_received=1,
                                  num_migrations_in=2, num_migrations_out=0, draining=True,
                                  pulling={"p": 0}, **kw)

    first, second = one(1), one(2)  # every 2nd report of 0.5 s lists the held requests
    assert first.req_ids is None and second.req_ids == ("a", "p")
    assert second.load.num_migrations_in == 2 and second.load.draining
    assert second.load == engine.load(num_migrations_in=2, draining=True)
    engine.step()  # the prompt's first full block is cached
    assert len(one(3).cache_stored) == 1 and one(4).cache_stored == ()
    assert len(one(5, snapshot_wanted=True).cache_snapshot) == 1


def test_queue_time_and_generated_tokens_are_counted_once_per_request(monkeypatch):
    """Queue time: joining this engine's queue to the first step that runs the request,
    once (not again when a preempted request is admitted again); every sampled token."""
    import types

    from ferry.services.worker.engine import engine as engine_module
    from ferry.services.worker.engine import scheduler as scheduler_module

    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time=lambda: clock[0],
                                      perf_counter=lambda: clock[0])
    monkeypatch.setattr(engine_module, "time", fake_time)
    monkeypatch.setattr(scheduler_module, "time", fake_time)
    engine = make_engine(max_num_seqs=1)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("a", [1, 2, 3], params)
    engine.add_request("b", [4, 5, 6], params)
    clock[0] += 0.003
    collector = Collector()
    step(engine, collector)  # a starts after 3 ms; b waits for a's slot
    clock[0] += 0.2
    run_all(engine, collector)  # b starts 203 ms after it came
    queue = engine.scheduler.queue_time
    bounds = queue.bounds
    assert queue.cumulative()[bounds.index(0.0025)] == 0
    assert queue.cumulative()[bounds.index(0.005)] == 1
    assert queue.cumulative()[bounds.index(0.25)] == 2 == queue.count
    assert queue.sum == pytest.approx(0.003 + 0.203)
    assert engine.load().num_generation_tokens == 6

    preempting = make_engine(num_blocks=14, budget=64)
    add_all(preempting, max_tokens=20)
    run_all(preempting)
    assert preempting.scheduler.num_preemptions > 0
    assert preempting.scheduler.queue_time.count == len(PROMPTS)
    assert preempting.load().num_generation_tokens == 20 * len(PROMPTS)


def test_request_that_outgrows_the_whole_cache_finishes_instead_of_thrashing():
    engine = make_engine(num_blocks=5, block_size=4)
    engine.add_request("big", [1] * 10, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    collector = Collector()
    run_all(engine, collector)
    assert collector.reasons["big"] == "length"
    # 20 KV slots hold 10 prompt + 10 output tokens; the 11th output needs no slot yet.
    assert len(collector.tokens["big"]) == 11
    assert engine.scheduler.num_preemptions == 0


def _running_engine(prompt_lens, num_blocks=64):
    """An engine (block size 4) whose requests r0, r1, ... all run, holding their prompts."""
    engine = make_engine(num_blocks=num_blocks, budget=256)
    for i, n in enumerate(prompt_lens):
        engine.add_request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=50))
    engine.step()
    assert len(engine.scheduler.running) == len(prompt_lens)
    return engine


def test_migration_choice_relief_takes_the_smallest_request_that_covers_the_lack():
    from ferry.services.worker.migration.choice import pick_request

    # blocks held (prompt + 1 token, 4 per block): r0 2, r1 5, r2 9, r3 13 of 40
    engine = _running_engine([7, 19, 35, 51], num_blocks=40)
    free = engine.blocks.num_available
    # a queued 60-token request needs 15 blocks: lacking 15 + 4 running - free
    engine.add_request("q", list(range(1, 61)), SamplingParams(max_tokens=5))
    lacking = 15 + 4 - free
    assert 5 < lacking <= 9
    assert pick_request(engine, dst_free_blocks=8) == "r0"  # only r0 fits there
    assert pick_request(engine, dst_free_blocks=100) == "q"  # the queued one fits: it goes
    assert pick_request(engine, ["q"], dst_free_blocks=100) == "r2"  # relief: covers the lack
    assert pick_request(engine, ["q"], dst_free_blocks=100, choice="shortest") == "r0"
    assert pick_request(engine, ["q", "r2"], dst_free_blocks=100) == "r3"  # else the largest
    assert pick_request(engine, ["q"], dst_free_blocks=12) == "r1"  # largest that fits
    with pytest.raises(ValueError, match="unknown migration choice"):
        pick_request(engine, ["q"], choice="longest")
