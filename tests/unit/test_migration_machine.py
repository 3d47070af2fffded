"""The migration state machines (services/worker/migration/machine.py) with no sockets:
a synchronous driver here runs both sides' ops on two engines (TokenKVExecutor, whose KV
holds the tokens, so a wrong copy shows in the outputs)."""

from __future__ import annotations

from ferry.common import wire
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.request import Status
from ferry.services.worker.migration import machine
from ferry.services.worker.migration.machine import (
    GROWTH_BLOCKS,
    Incoming,
    InPhase,
    Outgoing,
    Phase,
    blocks_needed,
)
from tests.unit.test_engine_core import Collector, make_engine, run_all, step


class Pair:
    """Source and destination engines and one migration of `req_id` between them."""

    def __init__(self, *, src_blocks=64, dst_blocks=64, stage_limit=8, last_stage_blocks=2,
                 req_id="r0"):
        self.src = make_engine(num_blocks=src_blocks, budget=256)
        self.dst = make_engine(num_blocks=dst_blocks, budget=256)
        self.out = Outgoing(migration_id="m1", req_id=req_id, src_instance_id="a",
                            src_inbox_addr="a", kv_block_bytes=1, block_size=4,
                            stage_limit=stage_limit, last_stage_blocks=last_stage_blocks)
        self.inc: Incoming | None = None
        self.sent: list = []  # every message, both ways
        self.copy: machine.Copy | None = None
        self.recv: machine.Recv | None = None
        self.to_dst: list = []  # held while a stage is received
        self.wants_boundary = False
        self.done: list[machine.Done] = []
        self.collector = Collector()

    @property
    def req(self):
        return self.src.get(self.out.req_id)

    def start(self):
        self.src_ops(self.out.start(self.req, self.src.computed_hashes(self.out.req_id), ""))

    def src_ops(self, ops):
        for op in ops:
            if isinstance(op, machine.Send):
                self.sent.append(op.msg)
                self.deliver(op.msg)
            elif isinstance(op, machine.Copy):
                self.copy = op
            elif isinstance(op, machine.WaitStepBoundary):
                self.wants_boundary = True
            elif isinstance(op, machine.Pause):
                self.src.pause(self.out.req_id)
            elif isinstance(op, machine.Commit):
                msg = wire.MigCommit(migration_id="m1", kv_checksum=None,
                                     state=self.src.export_state(self.out.req_id))
                self.sent.append(msg)
                self.deliver(msg)
            elif isinstance(op, machine.Resume):
                if self.req is not None and self.req.status is Status.PAUSED:
                    self.src.resume(self.out.req_id)
            elif isinstance(op, machine.Remove):
                self.src.remove(self.out.req_id)
            elif isinstance(op, machine.Done):
                self.done.append(op)

    def deliver(self, msg):
        if isinstance(msg, wire.MigPrealloc):
            self.inc = Incoming(msg, self.dst.blocks)
            return self.dst_ops(self.inc.reserve() or self.inc.opened("g", "s"))
        if self.recv is not None and not isinstance(msg, wire.MigAbort):
            return self.to_dst.append(msg)
        self.dst_ops(self.inc.message(msg))

    def dst_ops(self, ops):
        for op in ops:
            if isinstance(op, machine.Send):
                self.sent.append(op.msg)
                self.src_ops(self.out.message(op.msg, self.req))
            elif isinstance(op, machine.Recv):
                self.recv = op
            elif isinstance(op, machine.Import):
                self.dst.import_request(op.state, self.inc.prealloc.prompt_token_ids,
                                        list(op.block_ids))
            elif isinstance(op, machine.Remove):
                self.dst.remove(self.out.req_id)

    def finish_copy(self):
        """The stage's blocks land: copied KV, the destination acks, the source goes on."""
        copy, recv = self.copy, self.recv
        assert copy is not None and recv is not None and len(copy.block_ids) == len(recv.block_ids)
        for s, d in zip(copy.block_ids, recv.block_ids, strict=True):
            self.dst.executor.kv_cache[d] = self.src.executor.kv_cache[s]
        self.copy = self.recv = None
        self.dst_ops(self.inc.received(recv.stage_index))
        self.src_ops(self.out.copied(self.req))
        while self.to_dst and self.recv is None:
            self.deliver(self.to_dst.pop(0))

    def boundary(self):
        assert self.wants_boundary
        self.wants_boundary = False
        self.src_ops(self.out.step_boundary(self.req))

    def step_dst(self):
        step(self.dst, self.collector)
        req = self.dst.get(self.out.req_id)
        if self.inc.phase is InPhase.COMMITTED and (
                req is None or req.num_computed_tokens > self.inc.num_computed_at_import):
            self.dst_ops(self.inc.stepped(1.0, 2.0))

    def check_clean(self):
        """Both engines consistent; once all ends, every block is back."""
        self.src.check_invariants()
        self.dst.check_invariants()
        assert not self.dst.blocks.reserved("m1")


PROMPT = list(range(1, 31))  # 30 tokens: 7 full blocks of 4 and 2 more tokens


def running(pair: Pair, prompt=PROMPT, max_tokens=20, steps=3):
    pair.src.add_request("r0", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    step(pair.src, pair.collector, steps)


def test_happy_path_stages_then_pauses_and_commits_after_the_first_step_there():
    pair = Pair()
    running(pair)
    pair.start()
    prealloc = pair.sent[0]
    assert isinstance(prealloc, wire.MigPrealloc)
    assert prealloc.num_blocks == blocks_needed(pair.req, 4) == 13  # 33 tokens + 4 blocks (cap 50)
    assert pair.out.phase is Phase.STAGING and pair.copy is not None
    assert len(pair.copy.block_ids) == 8  # all full computed blocks, the request decodes on
    step(pair.src, pair.collector, 2)  # decoding meanwhile
    pair.finish_copy()  # 0-1 new full blocks: few enough, the final stage at a boundary
    assert pair.out.phase is Phase.FINAL and pair.wants_boundary
    pair.boundary()
    assert pair.req.status is Status.PAUSED and pair.out.phase is Phase.COMMIT
    assert isinstance(pair.sent[-1], wire.MigCommit) and pair.copy.final
    pair.finish_copy()  # the commit is handled after the last blocks: imported
    assert pair.inc.phase is InPhase.COMMITTED and pair.req is not None  # src keeps it
    pair.step_dst()  # its first step there: acked, the source lets go
    assert pair.done == [machine.Done(True, "")] and pair.out.phase is Phase.COMMITTED
    assert pair.req is None and pair.out.num_stages == 2
    pair.check_clean()
    run_all(pair.dst, pair.collector)  # indices go on where the source stopped
    assert len(pair.collector.tokens["r0"]) == 20


def test_stage_limit_zero_is_stop_and_copy():
    pair = Pair(stage_limit=0)
    running(pair)
    pair.start()
    assert pair.wants_boundary and pair.copy is None
    pair.boundary()
    assert pair.copy.final and len(pair.copy.block_ids) == 8  # every computed block
    pair.finish_copy()
    pair.step_dst()
    assert pair.out.phase is Phase.COMMITTED and pair.out.num_stages == 1


def test_dedup_skips_the_blocks_the_destination_caches():
    pair = Pair()
    pair.dst.add_request("warm", PROMPT, SamplingParams(max_tokens=1, ignore_eos=True))
    run_all(pair.dst)  # the prompt's 7 full blocks stay cached (idle) there
    running(pair)
    pair.start()
    reply = next(m for m in pair.sent if isinstance(m, wire.MigPreallocReply))
    assert reply.ok and reply.num_cached_blocks == 7 == pair.out.num_blocks_skipped
    # 8 computed full blocks, 7 cached there: one left, few enough for the final stage
    pair.boundary()
    stage = next(m for m in pair.sent if isinstance(m, wire.MigStage))
    assert stage.first_block_index == 7
    pair.finish_copy()
    pair.step_dst()
    assert pair.out.phase is Phase.COMMITTED and pair.out.num_blocks_copied == 1  # 8 computed, 7 cached
    run_all(pair.dst, pair.collector)  # indices go on where the source stopped
    assert len(pair.collector.tokens["r0"]) == 20


def test_queued_request_moves_its_state_alone():
    pair = Pair(src_blocks=8)
    running(pair, steps=1)
    pair.src.add_request("r1", list(range(1, 21)), SamplingParams(max_tokens=5, ignore_eos=True))  # no room
    pair.out = Outgoing(migration_id="m1", req_id="r1", src_instance_id="a", src_inbox_addr="a",
                        kv_block_bytes=1, block_size=4, stage_limit=8, last_stage_blocks=2)
    assert pair.req.status is Status.WAITING
    pair.start()
    assert pair.copy is None and not any(isinstance(m, wire.MigStage) for m in pair.sent)
    assert pair.out.phase is Phase.COMMITTED and pair.req is None  # no KV: acked at import
    assert pair.dst.get("r1").status is Status.WAITING


def test_destination_without_memory_refuses_and_the_request_goes_on():
    pair = Pair(dst_blocks=4)
    running(pair)
    pair.start()
    assert pair.done[0].committed is False and "no memory" in pair.done[0].reason
    assert not any(isinstance(m, wire.MigAbort) for m in pair.sent)  # it said so itself
    assert pair.req.status is Status.RUNNING
    assert pair.dst.blocks.num_available == 4
    pair.check_clean()


def _abort_checks(pair: Pair):
    assert pair.out.phase is Phase.ABORTED and pair.inc.phase is InPhase.ABORTED
    assert pair.done[-1].committed is False
    assert pair.src.get("r0").status is Status.RUNNING  # resumed if it was paused
    assert pair.dst.get("r0") is None
    assert pair.dst.blocks.num_available == pair.dst.blocks.num_total
    pair.check_clean()


def test_abort_while_staging_frees_the_destination():
    pair = Pair()
    running(pair)
    pair.start()
    pair.src_ops(pair.out.cancel("client abort"))  # a stage is being copied
    assert isinstance(pair.sent[-1], wire.MigAbort)
    _abort_checks(pair)
    assert pair.out.copied(pair.req) == []  # the copy ending later changes nothing


def test_abort_from_the_destination_during_the_final_stage_resumes_the_source():
    pair = Pair(stage_limit=0)
    running(pair)
    pair.start()
    pair.boundary()
    assert pair.req.status is Status.PAUSED
    pair.dst_ops(pair.inc.failed("recv failed"))
    assert pair.done[-1].reason == "destination aborted: recv failed"
    _abort_checks(pair)


def test_ack_timeout_after_commit_drops_the_copy_there():
    pair = Pair()
    running(pair)
    pair.start()
    pair.finish_copy()
    pair.boundary()
    pair.finish_copy()
    assert pair.inc.phase is InPhase.COMMITTED and pair.dst.get("r0") is not None
    pair.src_ops(pair.out.timeout())
    assert pair.done[-1].reason == "timeout in phase commit"
    _abort_checks(pair)  # the destination removed its imported copy, emitting nothing


def test_prealloc_timeout_tells_the_destination():
    pair = Pair()
    running(pair)
    pair.out.start(pair.req, [], "")  # the MigPrealloc is lost
    ops = pair.out.timeout()
    assert isinstance(ops[0], machine.Send) and isinstance(ops[0].msg, wire.MigAbort)
    assert ops[-1] == machine.Done(False, "timeout in phase prealloc")


def test_destination_timeout_before_the_commit():
    pair = Pair()
    running(pair)
    pair.start()
    pair.dst_ops(pair.inc.timeout())
    assert pair.done[-1].reason == "destination aborted: timeout in phase reserved"
    _abort_checks(pair)


def test_request_finished_mid_migration_aborts():
    pair = Pair(last_stage_blocks=0)
    running(pair, max_tokens=5, steps=1)
    pair.start()
    run_all(pair.src, pair.collector)  # finishes while its first stage is copied
    pair.finish_copy()
    assert pair.done[-1].reason == "request finished during migration"
    assert isinstance(pair.sent[-1], wire.MigAbort)
    assert pair.dst.blocks.num_available == pair.dst.blocks.num_total
    pair.check_clean()


def test_request_preempted_mid_migration_aborts():
    pair = Pair()
    running(pair)
    pair.start()
    pair.req.status = Status.WAITING  # as the scheduler's preemption leaves it (machine only)
    pair.finish_copy()
    assert pair.done[-1].reason == "request was preempted during migration"


def test_no_memory_for_the_growth_at_the_final_stage_aborts_cleanly():
    pair = Pair(dst_blocks=16)
    running(pair, max_tokens=40)
    pair.start()
    assert pair.dst.blocks.num_available == 16 - 13
    pair.dst.blocks.reserve("hog", 3)  # the rest of the destination is taken
    for _ in range(8):  # decode past the prealloc's reservation (+ growth)
        step(pair.src, pair.collector)
    pair.finish_copy()
    pair.boundary()
    assert pair.done[-1].reason == "destination aborted: no memory to grow the reservation"
    assert pair.src.get("r0").status is Status.RUNNING
    assert not pair.dst.blocks.reserved("m1")
    pair.check_clean()


def test_growth_is_one_constant():
    from ferry.common.config import MIGRATION_GROWTH_BLOCKS, SchedulerConfig
    from ferry.services.worker.migration import choice

    assert GROWTH_BLOCKS == MIGRATION_GROWTH_BLOCKS == choice.GROWTH_BLOCKS
    assert SchedulerConfig.__dataclass_fields__["migrate_dst_growth_blocks"].default \
        == MIGRATION_GROWTH_BLOCKS
