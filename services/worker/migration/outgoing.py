"""Source side of one live migration: the asyncio driver of `machine.Outgoing`.

The machine decides (DESIGN §6; its docstring has the states); this runs its ops with
the real transport: control messages through `send`, KV blocks through `kv`
(KVTransport over NCCL/gloo, or SimulatedTransport), `step_boundary()` for the pause,
wall-clock timeouts on every reply. A copy is awaited before the next reply is read, so
a stage's blocks are sent before anything else happens to the migration.

After MigCommit is sent, an abort (ack timeout) resumes the request here *and* tells the
destination to drop its copy: if both ran for a while, the gateway drops the duplicate
token indices, so the client still sees each index once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.common import wire
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.engine.request import Status
from ferry.services.worker.migration import machine
from ferry.services.worker.migration.machine import Outgoing, Phase


@dataclass(frozen=True, slots=True)
class LocalCancel:
    """Queued into a migration's replies by this worker (client abort, shutdown)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationLimits:
    stage_limit: int  # stages before the final one
    last_stage_blocks: int  # pause once at most this many new full blocks remain
    timeout_s: float  # a reply not arriving within this aborts
    verify_kv: bool = False  # send a checksum of the KV with the commit


@dataclass(slots=True)
class OutgoingMigration:
    migration_id: str
    req_id: str
    dst_instance_id: str
    dst_inbox_addr: str
    replies: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=8))
    machine: Outgoing | None = None  # None: refused before it started
    num_bytes: int = 0
    started_s: float = field(default_factory=time.perf_counter)
    last_step_s: float = 0.0  # wall clock: end of the request's last step here
    downtime_s: float = 0.0
    token_gap_s: float = 0.0
    max_stages: int = -1  # from MigrateOut: -1 the worker's limit
    first_stage_bytes: int = 0
    first_stage_s: float = 0.0
    reason: str = ""

    def done_message(self, src_instance_id: str) -> wire.MigrationDone:
        m = self.machine
        committed = m is not None and m.phase is Phase.COMMITTED
        return wire.MigrationDone(
            migration_id=self.migration_id,
            req_id=self.req_id,
            src_instance_id=src_instance_id,
            dst_instance_id=self.dst_instance_id,
            committed=committed,
            reason=self.reason if m is None else m.reason,
            num_stages=0 if m is None else m.num_stages,
            num_blocks=0 if m is None else m.num_blocks_copied,
            num_bytes=self.num_bytes,
            total_s=time.perf_counter() - self.started_s,
            downtime_s=self.downtime_s,
            first_stage_bytes=self.first_stage_bytes,
            first_stage_s=self.first_stage_s,
            kv_verified=committed and m.kv_verified,
            token_gap_s=self.token_gap_s,
            num_blocks_skipped=0 if m is None else m.num_blocks_skipped,
        )


class OutgoingRunner:
    """Drives one OutgoingMigration. `send(addr, msg)` is the control channel; `kv` the
    KV transport (KVTransport or SimulatedTransport); `step_boundary()` returns right
    after the engine's next step."""

    def __init__(
        self,
        mig: OutgoingMigration,
        *,
        engine: Engine,
        kv: Any,
        send: Callable[[str, Any], None],
        instance_id: str,
        inbox_addr: str,
        limits: MigrationLimits,
        step_boundary: Callable[[], Awaitable[None]],
        prealloc_locks: dict[str, asyncio.Lock] | None = None,
    ) -> None:
        self.mig = mig
        self.engine = engine
        self.kv = kv
        self.send = send
        self.limits = limits
        self.step_boundary = step_boundary
        # dst instance id -> lock held from a MigPrealloc to joining the KV group of its
        # reply: a second migration to the same destination names that group instead of
        # racing the first to create one (the destination would replace the first's).
        self.prealloc_locks = prealloc_locks if prealloc_locks is not None else {}
        self.machine = mig.machine = Outgoing(
            migration_id=mig.migration_id, req_id=mig.req_id, src_instance_id=instance_id,
            src_inbox_addr=inbox_addr, kv_block_bytes=kv.block_bytes,
            block_size=engine.blocks.block_size,
            stage_limit=limits.stage_limit if mig.max_stages < 0 else mig.max_stages,
            last_stage_blocks=limits.last_stage_blocks, verify_kv=limits.verify_kv)
        self._copy: asyncio.Future | None = None  # the stage being sent
        self._copy_start = 0.0

    async def run(self) -> OutgoingMigration:
        m = self.machine
        req = self.engine.get(m.req_id)
        try:
            if req is None or req.status not in (Status.RUNNING, Status.WAITING):
                self._apply(m.start(req, [], ""))
            else:
                async with self.prealloc_locks.setdefault(self.mig.dst_instance_id,
                                                          asyncio.Lock()):
                    await self._run_ops(m.start(
                        req, self.engine.computed_hashes(req.req_id),
                        self.kv.sending_group_id(self.mig.dst_instance_id)))
                    while m.phase is Phase.PREALLOC:
                        await self._next_event()
            while not m.ended:
                await self._next_event()
        except TimeoutError:
            await self._run_ops(m.timeout())
        except Exception as exc:  # transport failures: peer died, group broke
            await self._run_ops(m.failed(f"{type(exc).__name__}: {exc}"))
        finally:
            if self._copy is not None and not self._copy.done():
                self._copy.cancel()
        return self.mig

    async def _next_event(self) -> None:
        """A copy in flight is awaited first (no timeout: the transport has its own), then
        replies, each within the timeout."""
        m = self.machine
        if self._copy is not None:
            copy, self._copy = self._copy, None
            await copy
            return await self._run_ops(m.copied(self.engine.get(m.req_id)))
        msg = await asyncio.wait_for(self.mig.replies.get(), self.limits.timeout_s)
        if isinstance(msg, LocalCancel):
            return await self._run_ops(m.cancel(msg.reason))
        await self._run_ops(m.message(msg, self.engine.get(m.req_id)))

    async def _run_ops(self, ops: list) -> None:
        for op in ops:
            if isinstance(op, machine.WaitStepBoundary):
                await self.step_boundary()
                req = self.engine.get(self.machine.req_id)
                await self._run_ops(self.machine.step_boundary(req))
            elif isinstance(op, machine.Copy):
                self._start_copy(op)
                await asyncio.sleep(0)  # the send is queued before the next message (commit)
            else:
                self._apply(op)

    def _apply(self, op: Any) -> None:
        mig, engine = self.mig, self.engine
        if isinstance(op, machine.Send):
            self.send(mig.dst_inbox_addr, op.msg)
        elif isinstance(op, machine.Join):
            self.kv.join_sending(mig.dst_instance_id, op.group_id, op.store_addr)
        elif isinstance(op, machine.Pause):
            req = engine.pause(mig.req_id)
            if op.at_step_boundary:
                mig.last_step_s = req.last_step_s
        elif isinstance(op, machine.Commit):
            self._send_commit(op)
        elif isinstance(op, machine.Resume):
            req = engine.get(mig.req_id)
            if req is not None and req.status is Status.PAUSED:
                engine.resume(mig.req_id)
        elif isinstance(op, machine.Remove):
            engine.remove(mig.req_id)
            ack = self.machine.commit_ack
            if mig.last_step_s and ack.resumed_s:
                mig.downtime_s = max(0.0, ack.resumed_s - mig.last_step_s)
                mig.token_gap_s = max(0.0, ack.first_token_s - mig.last_step_s)
        elif not isinstance(op, machine.Done):
            raise TypeError(f"unexpected op {op!r}")

    def _start_copy(self, op: machine.Copy) -> None:
        # Pinned: if the request finishes or is preempted meanwhile, its blocks are not
        # handed to anyone else until the read is over.
        block_ids = list(op.block_ids)
        self.engine.blocks.incref(block_ids)
        self._copy_start = time.perf_counter()
        first = op.stage_index == 0

        async def copy() -> None:
            try:
                num_bytes = await self.kv.send(self.mig.dst_instance_id, block_ids)
            finally:
                self.engine.blocks.free(block_ids)
            self.mig.num_bytes += num_bytes
            if first:
                self.mig.first_stage_bytes = num_bytes
                self.mig.first_stage_s = time.perf_counter() - self._copy_start

        self._copy = asyncio.ensure_future(copy())

    def _send_commit(self, op: machine.Commit) -> None:
        mig, engine = self.mig, self.engine
        state = engine.export_state(mig.req_id)
        checksum = None
        if op.verify:
            req = engine.get(mig.req_id)
            num_blocks = engine.blocks.blocks_for(state.num_computed_tokens)
            checksum = self.kv.checksum(req.block_ids[:num_blocks])
        self.send(mig.dst_inbox_addr, wire.MigCommit(
            migration_id=mig.migration_id, kv_checksum=checksum, state=state))
