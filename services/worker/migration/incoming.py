"""Destination side of one live migration.

    RESERVED ─MigStage─▶ receive blocks into the reservation (repeat)
        │ MigCommit
        ▼
    COMMITTED: request imported, KV blocks taken from the reservation, the rest freed;
               MigCommitAck once the request has run its first step here
    any MigAbort / timeout / failure ─▶ reservation released, cached blocks unclaimed (and
                                        an imported copy dropped)

Dedup: the leading blocks of the request that this instance caches already (their prefix
hashes came with MigPrealloc) are claimed at the start and never sent; the request's
block table here is those blocks, then the received ones:

    logical block   0 .. k-1            k .. n-1
    block table     cached_block_ids    reservation[0 .. n-k-1]   (MigStage indices >= k)

Messages of one migration are handled in order by its own task (`inbox`, bounded).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.common import wire
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.migration.state import from_wire


class InPhase(enum.Enum):
    RESERVED = "reserved"
    COMMITTED = "committed"  # imported; waiting for its first step here
    DONE = "done"
    ABORTED = "aborted"


@dataclass(slots=True)
class IncomingMigration:
    migration_id: str
    req_id: str
    src_instance_id: str
    src_inbox_addr: str
    group_id: str
    prompt_token_ids: tuple[int, ...]  # from MigPrealloc
    # Cached blocks holding the request's first blocks, claimed (one reference each) until
    # the commit hands them to the request, or an abort frees them.
    cached_block_ids: list[int] = field(default_factory=list)
    phase: InPhase = InPhase.RESERVED
    inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=64))
    first_step: asyncio.Event = field(default_factory=asyncio.Event)
    resumed_s: float = 0.0  # wall clock at the start of the request's first step here
    first_token_s: float = 0.0  # wall clock at the end of that step
    num_computed_at_import: int = 0
    started_s: float = field(default_factory=time.perf_counter)


class IncomingRunner:
    def __init__(
        self,
        mig: IncomingMigration,
        *,
        engine: Engine,
        kv: Any,
        send: Callable[[str, Any], None],
        timeout_s: float,
        on_imported: Callable[[], None],
    ) -> None:
        self.mig = mig
        self.engine = engine
        self.kv = kv
        self.send = send
        self.timeout_s = timeout_s
        self.on_imported = on_imported

    async def run(self) -> IncomingMigration:
        mig = self.mig
        try:
            while mig.phase is InPhase.RESERVED:
                msg = await asyncio.wait_for(mig.inbox.get(), self.timeout_s)
                if isinstance(msg, wire.MigStage):
                    await self._stage(msg)
                elif isinstance(msg, wire.MigCommit):
                    self._commit(msg)
                elif isinstance(msg, wire.MigAbort):
                    raise _Abort(msg.reason)
            await self._wait_first_step()
        except _Abort as err:
            self._abort(err.reason, tell_source=err.tell_source)
        except TimeoutError:
            self._abort(f"timeout in phase {mig.phase.value}", tell_source=True)
        except Exception as exc:
            self._abort(f"{type(exc).__name__}: {exc}", tell_source=True)
        return mig

    async def _stage(self, msg: wire.MigStage) -> None:
        mig = self.mig
        blocks = self.engine.blocks
        num_cached = len(mig.cached_block_ids)
        missing = msg.num_blocks_needed - num_cached - len(blocks.reserved(mig.migration_id))
        if missing > 0 and not blocks.reserve(mig.migration_id, missing):
            raise _Abort("no memory to grow the reservation", tell_source=True)
        reserved = blocks.reserved(mig.migration_id)
        start = msg.first_block_index - num_cached  # index in the reservation
        end = start + msg.num_blocks
        if start < 0 or end > len(reserved):
            raise _Abort(f"stage covers blocks [{msg.first_block_index}, {end + num_cached}): "
                         f"{num_cached} cached here, {len(reserved)} reserved",
                         tell_source=True)
        await self.kv.recv(mig.group_id, reserved[start:end])
        self.send(mig.src_inbox_addr, wire.MigStageAck(
            migration_id=mig.migration_id, stage_index=msg.stage_index, ok=True, reason=""))

    def _commit(self, msg: wire.MigCommit) -> None:
        mig = self.mig
        state = msg.state
        blocks = self.engine.blocks
        num_new = blocks.blocks_for(state.num_computed_tokens) - len(mig.cached_block_ids)
        if num_new > len(blocks.reserved(mig.migration_id)):
            raise _Abort("commit needs more blocks than were received", tell_source=True)
        if num_new < 0:
            raise _Abort("commit has fewer blocks than were cached here", tell_source=True)
        if msg.kv_checksum is not None:
            held = mig.cached_block_ids + blocks.reserved(mig.migration_id)[:num_new]
            received = self.kv.checksum(held)
            if received != msg.kv_checksum:
                raise _Abort(f"KV checksum mismatch ({received} != {msg.kv_checksum})",
                             tell_source=True)
        block_ids = mig.cached_block_ids + blocks.take_reserved(mig.migration_id, num_new)
        mig.cached_block_ids = []
        try:
            self.engine.import_request(from_wire(state, mig.prompt_token_ids), block_ids)
        except Exception:
            self.engine.blocks.free(block_ids)  # the request's only once it was imported
            raise
        mig.num_computed_at_import = state.num_computed_tokens
        mig.phase = InPhase.COMMITTED
        if state.num_computed_tokens == 0:
            mig.first_step.set()  # a queued request: nothing to wait for
        self.on_imported()

    async def _wait_first_step(self) -> None:
        """Ack the commit once the request has stepped here (or finished, or if the
        source aborts first: then drop the copy)."""
        mig = self.mig
        waiter = asyncio.ensure_future(mig.first_step.wait())
        aborter = asyncio.ensure_future(mig.inbox.get())
        done, _ = await asyncio.wait({waiter, aborter}, timeout=self.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        aborter.cancel()
        if aborter in done and isinstance(aborter.result(), wire.MigAbort):
            raise _Abort(aborter.result().reason)
        if waiter not in done:
            raise _Abort("request did not step after import", tell_source=True)
        self.send(mig.src_inbox_addr, wire.MigCommitAck(
            migration_id=mig.migration_id, ok=True, reason="", resumed_s=mig.resumed_s,
            first_token_s=mig.first_token_s))
        mig.phase = InPhase.DONE

    def note_step(self, started_s: float) -> None:
        """Called after each engine step while COMMITTED; started_s: the step's start."""
        req = self.engine.get(self.mig.req_id)
        if req is None or req.num_computed_tokens > self.mig.num_computed_at_import:
            self.mig.resumed_s = started_s
            self.mig.first_token_s = time.time() if req is None else req.last_step_s
            self.mig.first_step.set()

    def _abort(self, reason: str, *, tell_source: bool = False) -> None:
        mig = self.mig
        self.engine.blocks.release_reservation(mig.migration_id)
        self.engine.blocks.free(mig.cached_block_ids)
        mig.cached_block_ids = []
        if mig.phase in (InPhase.COMMITTED, InPhase.DONE) and self.engine.get(mig.req_id):
            # The source resumed the request: drop our copy without emitting anything.
            self.engine.remove(mig.req_id)
        if tell_source:
            self.send(mig.src_inbox_addr, wire.MigAbort(migration_id=mig.migration_id,
                                                        reason=reason))
        mig.phase = InPhase.ABORTED


class _Abort(Exception):
    def __init__(self, reason: str, *, tell_source: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tell_source = tell_source
