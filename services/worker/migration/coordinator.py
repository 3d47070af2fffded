"""One worker's live migrations: starts them, routes their control messages, bounds
their number, and reports each outcome to the scheduler.

Both directions are bounded by `WorkerConfig.max_migrations` (in and out counted
separately). Control messages carry a migration id; replies go to the outgoing
migration's queue, stages and commits to the incoming one's.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from ferry.common import wire
from ferry.common.config import WorkerConfig
from ferry.common.logging import get_logger
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.engine.request import RequestOutput, Status
from ferry.services.worker.migration.choice import pick_request
from ferry.services.worker.migration.incoming import IncomingMigration, IncomingRunner, InPhase
from ferry.services.worker.migration.kv_transfer import KVTransport, SimulatedTransport
from ferry.services.worker.migration.machine import Incoming
from ferry.services.worker.migration.outgoing import (
    LocalCancel,
    MigrationLimits,
    OutgoingMigration,
    OutgoingRunner,
)

# Messages the coordinator handles (the worker routes them to `handle`).
MIGRATION_MESSAGES = (
    wire.MigrateOut,
    wire.MigPrealloc,
    wire.MigPreallocReply,
    wire.MigStage,
    wire.MigStageAck,
    wire.MigCommit,
    wire.MigCommitAck,
    wire.MigAbort,
)
# Simulated workers move KV at this rate (H200 NVLink bulk rate measured for DESIGN §6).
SIM_BANDWIDTH_BYTES_S = 300e9
# Requests recently migrated away, remembered to forward late aborts to their new home.
MAX_FORWARDS = 4096


def make_transport(config: WorkerConfig, engine: Engine) -> KVTransport | SimulatedTransport:
    kv_cache = getattr(engine.executor, "kv_cache", None)
    if kv_cache is None:
        return SimulatedTransport(
            block_bytes=getattr(engine.executor, "kv_block_bytes", 0) or 1,
            bandwidth_bytes_s=SIM_BANDWIDTH_BYTES_S,
            instance_id=config.instance_id,
        )
    return KVTransport(
        kv_cache,
        instance_id=config.instance_id,
        advertise_host=host_of(config.inbox.advertise) or "127.0.0.1",
        chunk_bytes=config.migration_chunk_bytes,
        timeout_s=config.migration_timeout_s,
        bind_host=host_of(config.inbox.bind) or "0.0.0.0",  # the inbox's interface
    )


def host_of(endpoint: str) -> str | None:
    """The host of tcp://HOST:PORT; None for "*" (every interface) or no host."""
    host = urlparse(endpoint.replace("tcp://", "http://", 1)).hostname
    return None if host in (None, "*") else host


class MigrationCoordinator:
    def __init__(
        self,
        *,
        config: WorkerConfig,
        engine: Engine,
        send: Callable[[str, Any], None],
        on_request_placed: Callable[[], None],
        kv: Any | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.send = send
        self.on_request_placed = on_request_placed
        self.kv = kv if kv is not None else make_transport(config, engine)
        self.limits = MigrationLimits(
            stage_limit=config.migration_stage_limit,
            last_stage_blocks=config.migration_last_stage_blocks,
            timeout_s=config.migration_timeout_s,
            verify_kv=config.migration_verify_kv,
        )
        self.log = get_logger(instance_id=config.instance_id)
        self.outgoing: dict[str, OutgoingMigration] = {}
        self.incoming: dict[str, IncomingRunner] = {}
        self.moved_to: OrderedDict[str, str] = OrderedDict()  # req_id -> dst inbox
        self.finished_incoming: OrderedDict[str, str] = OrderedDict()  # migration -> req
        self.num_committed = 0
        self.num_aborted = 0
        self._tasks: set[asyncio.Task] = set()
        self.prealloc_locks: dict[str, asyncio.Lock] = {}  # see OutgoingRunner
        self._step_done = asyncio.Event()  # set (and replaced) after every engine step
        self._handlers: dict[type, Callable[[Any], None]] = {
            wire.MigrateOut: self.handle_migrate_out,
            wire.MigPrealloc: self.handle_prealloc,
            wire.MigPreallocReply: self.route_reply,
            wire.MigStage: self.route_to_incoming,
            wire.MigStageAck: self.route_reply,
            wire.MigCommit: self.route_to_incoming,
            wire.MigCommitAck: self.route_reply,
            wire.MigAbort: self.handle_abort,
        }

    @property
    def num_outgoing(self) -> int:
        return len(self.outgoing)

    @property
    def num_incoming(self) -> int:
        return len(self.incoming)

    def handle(self, msg: Any) -> None:
        """Entry point for every message in MIGRATION_MESSAGES."""
        self._handlers[type(msg)](msg)

    # ---- source side ----------------------------------------------------------------------

    def handle_migrate_out(self, msg: wire.MigrateOut) -> None:
        mig = OutgoingMigration(
            migration_id=msg.migration_id,
            req_id=msg.req_id or "",
            dst_instance_id=msg.dst_instance_id,
            dst_inbox_addr=msg.dst_inbox_addr,
            max_stages=msg.max_stages,
        )
        if msg.dst_instance_id == self.config.instance_id:
            return self._refuse(mig, "destination is this instance")
        if len(self.outgoing) >= self.config.max_migrations:
            return self._refuse(mig, "too many migrations out of this instance")
        req_id = msg.req_id or pick_request(
            self.engine, {m.req_id for m in self.outgoing.values()},
            dst_free_blocks=msg.dst_free_blocks)
        if req_id is None:
            return self._refuse(mig, "no request to migrate")
        if any(m.req_id == req_id for m in self.outgoing.values()):
            return self._refuse(mig, f"{req_id} is already migrating")
        if self.engine.get(req_id) is None:
            return self._refuse(mig, f"{req_id} is not on this instance")
        mig.req_id = req_id
        self.outgoing[mig.migration_id] = mig
        runner = OutgoingRunner(
            mig,
            engine=self.engine,
            kv=self.kv,
            send=self.send,
            instance_id=self.config.instance_id,
            inbox_addr=self.config.inbox.advertise,
            limits=self.limits,
            step_boundary=self.step_boundary,
            prealloc_locks=self.prealloc_locks,
        )
        self._spawn(self._run_outgoing(runner))

    async def _run_outgoing(self, runner: OutgoingRunner) -> None:
        mig = await runner.run()
        self.outgoing.pop(mig.migration_id, None)
        self._finish(mig)

    def _refuse(self, mig: OutgoingMigration, reason: str) -> None:
        mig.reason = reason
        self._finish(mig)

    def _finish(self, mig: OutgoingMigration) -> None:
        done = mig.done_message(self.config.instance_id)
        if done.committed:
            self.num_committed += 1
            self.moved_to[mig.req_id] = mig.dst_inbox_addr
            while len(self.moved_to) > MAX_FORWARDS:
                self.moved_to.popitem(last=False)
        else:
            self.num_aborted += 1
        self.log.info(
            "migration", req_id=mig.req_id, migration_id=mig.migration_id,
            dst_instance_id=mig.dst_instance_id, committed=done.committed, reason=done.reason,
            num_stages=done.num_stages, num_blocks=done.num_blocks,
            num_blocks_skipped=done.num_blocks_skipped, num_bytes=done.num_bytes,
            total_s=round(done.total_s, 6), downtime_s=round(done.downtime_s, 6),
        )
        self.send(self.config.scheduler_addr, done)

    def route_reply(self, msg: Any) -> None:
        mig = self.outgoing.get(msg.migration_id)
        if mig is None:
            return  # a late reply to a migration that already ended
        try:
            mig.replies.put_nowait(msg)
        except asyncio.QueueFull:
            self.log.warning("migration_reply_dropped", migration_id=msg.migration_id)

    def cancel_request(self, req_id: str, *, reason: str, attempt: int | None = None) -> None:
        """The request is being aborted here: stop any migration of it, and forward the
        abort (for the same attempt) if it already moved away."""
        for mig in self.outgoing.values():
            if mig.req_id == req_id and not mig.replies.full():
                mig.replies.put_nowait(LocalCancel(reason))
        dst = self.moved_to.pop(req_id, None)
        if dst is not None:
            self.send(dst, wire.Abort(req_id=req_id, reason=reason, attempt=attempt))

    # ---- destination side -----------------------------------------------------------------

    def handle_prealloc(self, msg: wire.MigPrealloc) -> None:
        reason = self._incoming_refusal(msg)
        if reason is not None:
            self.send(msg.src_inbox_addr, wire.MigPreallocReply(
                migration_id=msg.migration_id, ok=False, reason=reason, group_id="",
                store_addr=""))
            return
        m = Incoming(msg, self.engine.blocks, kv_checksum=self.kv.checksum)
        ops = m.reserve()
        group_id = ""
        if not ops:
            try:
                group_id, store_addr = self.kv.open_receiving(msg.src_instance_id, msg.group_id)
            except Exception as exc:
                ops = m.open_failed(str(exc))
            else:
                ops = m.opened(group_id, store_addr)
        mig = IncomingMigration(machine=m, src_inbox_addr=msg.src_inbox_addr, group_id=group_id)
        runner = IncomingRunner(mig, engine=self.engine, kv=self.kv, send=self.send,
                                timeout_s=self.config.migration_timeout_s,
                                on_imported=self.on_request_placed)
        if m.phase is InPhase.RESERVED:
            self.incoming[msg.migration_id] = runner
            self._spawn(self._run_incoming(runner))
        for op in ops:
            runner.apply(op)

    def _incoming_refusal(self, msg: wire.MigPrealloc) -> str | None:
        if len(self.incoming) >= self.config.max_migrations:
            return "too many migrations into this instance"
        if msg.kv_block_bytes != self.kv.block_bytes:
            return f"KV block size differs ({msg.kv_block_bytes} vs {self.kv.block_bytes} bytes)"
        if self.engine.get(msg.req_id) is not None:
            return f"{msg.req_id} is already here"
        if msg.migration_id in self.incoming:
            return "duplicate migration id"
        return None

    async def _run_incoming(self, runner: IncomingRunner) -> None:
        mig = await runner.run()
        self.incoming.pop(mig.migration_id, None)
        if mig.phase is InPhase.DONE:
            self.finished_incoming[mig.migration_id] = mig.req_id
            while len(self.finished_incoming) > MAX_FORWARDS:
                self.finished_incoming.popitem(last=False)

    def route_to_incoming(self, msg: Any) -> None:
        runner = self.incoming.get(msg.migration_id)
        if runner is None:
            # It ended here (timeout or abort) and the source was told; nothing to do.
            self.log.warning("migration_unknown", migration_id=msg.migration_id,
                             message=type(msg).__name__)
            return
        try:
            runner.mig.inbox.put_nowait(msg)
        except asyncio.QueueFull:
            self.log.warning("migration_message_dropped", migration_id=msg.migration_id)

    def handle_abort(self, msg: wire.MigAbort) -> None:
        """MigAbort goes to whichever side holds the migration id."""
        if msg.migration_id in self.outgoing:
            self.route_reply(msg)
        elif msg.migration_id in self.incoming:
            self.route_to_incoming(msg)
        else:
            self.engine.blocks.release_reservation(msg.migration_id)
            req_id = self.finished_incoming.pop(msg.migration_id, None)
            req = self.engine.get(req_id) if req_id else None
            if req is not None and req.status is not Status.FINISHED:
                # The source gave up waiting for our ack and resumed: drop our copy.
                self.engine.remove(req_id)

    # ---- both -----------------------------------------------------------------------------

    async def step_boundary(self, timeout_s: float = 0.5) -> None:
        """Return right after the engine's next step ends (at once if it is idle)."""
        if not self.engine.has_unfinished():
            return
        try:
            await asyncio.wait_for(self._step_done.wait(), timeout_s)
        except TimeoutError:
            pass  # no step came: nothing is in flight, so any moment is a boundary

    def after_step(self, outputs: list[RequestOutput], started_s: float | None = None) -> None:
        """Called by the step loop after every engine step; started_s: its wall-clock
        start (time.time())."""
        done, self._step_done = self._step_done, asyncio.Event()
        done.set()
        for runner in self.incoming.values():
            if runner.mig.phase is InPhase.COMMITTED:
                runner.note_step(time.time() if started_s is None else started_s)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.kv.close()
