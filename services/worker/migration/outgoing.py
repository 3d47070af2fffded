"""Source side of one live migration (DESIGN §6), as a coroutine over explicit phases.

    PREALLOC ─ok─▶ STAGING (stage k: blocks filled since stage k-1, request keeps decoding)
        │              │ few blocks left, or stage limit
        │              ▼
        │          FINAL (request paused: last blocks + state) ─▶ COMMIT ─ack─▶ COMMITTED
        └──────────────┴──────────────── any failure ──────────────────────▶ ABORTED

Dedup: MigPrealloc lists the prefix hashes of the request's computed full blocks; the
destination answers with how many leading ones it caches already (it claims them for the
request), and the stages start after them.

On abort the request goes on where it was (resumed if paused) and the destination is
told to free what it holds. After MigCommit is sent, an abort (ack timeout) resumes the
request here *and* tells the destination to drop its copy: if both ran for a while, the
gateway drops the duplicate token indices, so the client still sees each index once.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.common import wire
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.engine.request import Request, Status
from ferry.services.worker.migration.state import to_wire


class Phase(enum.Enum):
    PREALLOC = "prealloc"
    STAGING = "staging"
    FINAL = "final"
    COMMIT = "commit"
    COMMITTED = "committed"
    ABORTED = "aborted"


class MigrationAborted(Exception):
    def __init__(self, reason: str, *, notify_peer: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.notify_peer = notify_peer


@dataclass(frozen=True, slots=True)
class LocalCancel:
    """Queued into a migration's replies by this worker (client abort, shutdown)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationLimits:
    stage_limit: int  # stages before the final one
    last_stage_blocks: int  # pause once at most this many new full blocks remain
    growth_tokens: int  # tokens of headroom reserved for decoding during the stages
    timeout_s: float  # a reply not arriving within this aborts
    verify_kv: bool = False  # send a checksum of the KV with the commit


@dataclass(slots=True)
class OutgoingMigration:
    migration_id: str
    req_id: str
    dst_instance_id: str
    dst_inbox_addr: str
    phase: Phase = Phase.PREALLOC
    replies: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=8))
    num_stages: int = 0
    next_block: int = 0  # blocks [0, next_block) of the request's table are at dst
    num_blocks_skipped: int = 0  # of those, cached there already (never copied)
    num_bytes: int = 0
    started_s: float = field(default_factory=time.perf_counter)
    last_step_s: float = 0.0  # wall clock: end of the request's last step here
    downtime_s: float = 0.0
    token_gap_s: float = 0.0
    max_stages: int = -1  # from MigrateOut: -1 the worker's limit
    first_stage_bytes: int = 0
    first_stage_s: float = 0.0
    kv_verified: bool = False  # a checksum went with the commit (the ack means it matched)
    reason: str = ""

    def done_message(self, src_instance_id: str) -> wire.MigrationDone:
        return wire.MigrationDone(
            migration_id=self.migration_id,
            req_id=self.req_id,
            src_instance_id=src_instance_id,
            dst_instance_id=self.dst_instance_id,
            committed=self.phase is Phase.COMMITTED,
            reason=self.reason,
            num_stages=self.num_stages,
            num_blocks=self.next_block - self.num_blocks_skipped,
            num_bytes=self.num_bytes,
            total_s=time.perf_counter() - self.started_s,
            downtime_s=self.downtime_s,
            first_stage_bytes=self.first_stage_bytes,
            first_stage_s=self.first_stage_s,
            kv_verified=self.kv_verified and self.phase is Phase.COMMITTED,
            token_gap_s=self.token_gap_s,
            num_blocks_skipped=self.num_blocks_skipped,
        )


class OutgoingRunner:
    """Drives one OutgoingMigration. `send(addr, msg)` is the control channel; `kv` the
    KV transport (KVTransport or SimulatedTransport); `step_boundary()` returns right
    after the engine's next step. A stage reads only blocks counted in
    num_computed_tokens, written by steps the host already saw complete, so the copy
    waits for nothing on the device."""

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
        self.instance_id = instance_id
        self.inbox_addr = inbox_addr
        self.limits = limits
        self.step_boundary = step_boundary
        # dst instance id -> lock held from a MigPrealloc to joining the KV group of its
        # reply: a second migration to the same destination names that group instead of
        # racing the first to create one (the destination would replace the first's).
        self.prealloc_locks = prealloc_locks if prealloc_locks is not None else {}
        self.block_size = engine.blocks.block_size

    async def run(self) -> OutgoingMigration:
        mig = self.mig
        req = self.engine.get(mig.req_id)
        try:
            if req is None or req.status not in (Status.RUNNING, Status.WAITING):
                raise MigrationAborted("request is not running here", notify_peer=False)
            await self._prealloc(req)
            if req.status is Status.WAITING:
                self.engine.pause(req.req_id)
                await self._commit(req)
            else:
                await self._stages(req)
                await self._final(req)
        except MigrationAborted as err:
            self._abort(req, err)
        except TimeoutError:
            self._abort(req, MigrationAborted(f"timeout in phase {mig.phase.value}"))
        except Exception as exc:  # transport failures: peer died, group broke
            self._abort(req, MigrationAborted(f"{type(exc).__name__}: {exc}"))
        return mig

    # ---- phases ---------------------------------------------------------------------------

    async def _prealloc(self, req: Request) -> None:
        async with self.prealloc_locks.setdefault(self.mig.dst_instance_id, asyncio.Lock()):
            await self._prealloc_locked(req)

    async def _prealloc_locked(self, req: Request) -> None:
        mig = self.mig
        hashes = self.engine.computed_hashes(req.req_id)
        self.send(mig.dst_inbox_addr, wire.MigPrealloc(
            migration_id=mig.migration_id,
            req_id=req.req_id,
            src_instance_id=self.instance_id,
            src_inbox_addr=self.inbox_addr,
            num_blocks=self._blocks_needed(req),
            kv_block_bytes=self.kv.block_bytes,
            group_id=self.kv.sending_group_id(mig.dst_instance_id),
            prompt_token_ids=req.prompt_token_ids,
            block_hashes=tuple(hashes),
        ))
        reply = await self._reply(wire.MigPreallocReply)
        if not reply.ok:
            raise MigrationAborted(f"destination refused: {reply.reason}", notify_peer=False)
        if not 0 <= reply.num_cached_blocks <= len(hashes):
            raise MigrationAborted(f"destination claims {reply.num_cached_blocks} cached blocks "
                                   f"of {len(hashes)} offered")
        mig.next_block = mig.num_blocks_skipped = reply.num_cached_blocks
        self.kv.join_sending(mig.dst_instance_id, reply.group_id, reply.store_addr)
        mig.phase = Phase.STAGING

    async def _stages(self, req: Request) -> None:
        """Send full blocks while the request keeps decoding, until few are left."""
        mig = self.mig
        stage_limit = self.limits.stage_limit if mig.max_stages < 0 else mig.max_stages
        while mig.num_stages < stage_limit:
            self._check_still_here(req)
            num_full = req.num_computed_tokens // self.block_size
            if num_full - mig.next_block <= self.limits.last_stage_blocks:
                return
            await self._send_stage(req, num_full)

    async def _final(self, req: Request) -> None:
        mig = self.mig
        # Pause right after a step, before the next is scheduled: the request misses no
        # step it was already part of, and its KV is complete up to num_computed_tokens.
        await self.step_boundary()
        self._check_still_here(req)
        mig.phase = Phase.FINAL
        self.engine.pause(req.req_id)
        mig.last_step_s = req.last_step_s
        # The commit follows the last stage at once: the destination handles its messages
        # in order, so it adopts the request only after the stage's blocks arrived.
        last_stage = asyncio.ensure_future(self._send_stage(
            req, self.engine.blocks.blocks_for(req.num_computed_tokens), wait_ack=False))
        await asyncio.sleep(0)  # let the stage announce itself before the commit
        try:
            await self._commit(req, before_ack=last_stage)
        finally:
            if not last_stage.done():
                last_stage.cancel()

    async def _commit(self, req: Request, before_ack: asyncio.Future | None = None) -> None:
        mig = self.mig
        mig.phase = Phase.COMMIT
        state = self.engine.export_state(req.req_id)
        checksum = None
        if self.limits.verify_kv and state.num_computed_tokens:
            num_blocks = self.engine.blocks.blocks_for(state.num_computed_tokens)
            checksum = self.kv.checksum(req.block_ids[:num_blocks])
            mig.kv_verified = True
        self.send(mig.dst_inbox_addr, wire.MigCommit(
            migration_id=mig.migration_id,
            kv_checksum=checksum,
            state=to_wire(state),
        ))
        if before_ack is not None:
            await before_ack  # the last blocks are sent (their pins released)
        # The destination acks after the request's first step there.
        while True:
            ack = await self._reply(wire.MigCommitAck, wire.MigStageAck)
            if isinstance(ack, wire.MigStageAck):
                if not ack.ok:
                    raise MigrationAborted(f"final stage failed: {ack.reason}", notify_peer=False)
                continue
            break
        if not ack.ok:
            raise MigrationAborted(f"destination could not commit: {ack.reason}", notify_peer=False)
        if mig.last_step_s and ack.resumed_s:
            mig.downtime_s = max(0.0, ack.resumed_s - mig.last_step_s)
            mig.token_gap_s = max(0.0, ack.first_token_s - mig.last_step_s)
        self.engine.remove(req.req_id)
        mig.phase = Phase.COMMITTED

    async def _send_stage(self, req: Request, end_block: int, *, wait_ack: bool = True) -> None:
        mig = self.mig
        first = mig.next_block
        block_ids = req.block_ids[first:end_block]
        self.send(mig.dst_inbox_addr, wire.MigStage(
            migration_id=mig.migration_id,
            stage_index=mig.num_stages,
            first_block_index=first,
            num_blocks=len(block_ids),
            num_blocks_needed=self._blocks_needed(req),
        ))
        # Pinned: if the request finishes or is preempted meanwhile, its blocks are not
        # handed to anyone else until the read is over.
        self.engine.blocks.incref(block_ids)
        start = time.perf_counter()
        try:
            num_bytes = await self.kv.send(mig.dst_instance_id, block_ids)
        finally:
            self.engine.blocks.free(block_ids)
        mig.num_bytes += num_bytes
        if mig.num_stages == 0:
            mig.first_stage_bytes = num_bytes
            mig.first_stage_s = time.perf_counter() - start
        mig.next_block = end_block
        mig.num_stages += 1
        if wait_ack:
            ack = await self._reply(wire.MigStageAck)
            if not ack.ok:
                raise MigrationAborted(f"stage {ack.stage_index} failed: {ack.reason}",
                                       notify_peer=False)

    # ---- helpers --------------------------------------------------------------------------

    def _blocks_needed(self, req: Request) -> int:
        """Blocks the destination should hold by now: the request's tokens plus headroom
        for decoding during the next stage, never past its final length."""
        final_len = len(req.prompt_token_ids) + req.sampling.max_tokens
        return self.engine.blocks.blocks_for(
            min(req.num_tokens + self.limits.growth_tokens, final_len))

    def _check_still_here(self, req: Request) -> None:
        if self.engine.get(req.req_id) is not req or req.status is Status.FINISHED:
            raise MigrationAborted("request finished during migration")
        if req.status is Status.WAITING:
            raise MigrationAborted("request was preempted during migration")

    async def _reply(self, *types: type) -> Any:
        while True:
            msg = await asyncio.wait_for(self.mig.replies.get(), self.limits.timeout_s)
            if isinstance(msg, LocalCancel):
                raise MigrationAborted(msg.reason)
            if isinstance(msg, wire.MigAbort):
                raise MigrationAborted(f"destination aborted: {msg.reason}", notify_peer=False)
            if isinstance(msg, types):
                return msg

    def _abort(self, req: Request | None, err: MigrationAborted) -> None:
        mig = self.mig
        mig.reason = err.reason
        if err.notify_peer:
            # Also after PREALLOC: the destination may have reserved before its reply was lost.
            self.send(mig.dst_inbox_addr, wire.MigAbort(migration_id=mig.migration_id,
                                                        reason=err.reason))
        if req is not None and req.status is Status.PAUSED and self.engine.get(req.req_id) is req:
            self.engine.resume(req.req_id)
        mig.phase = Phase.ABORTED
