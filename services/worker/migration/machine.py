"""Live migration (DESIGN §6) as two pure state machines, one per side.

No sockets, no clock, no event loop: each method takes a message or an event and returns
the ops its driver runs, in order. Two drivers run them: the worker
(`outgoing.py`/`incoming.py`: ZMQ control messages, KV over NCCL/gloo, wall-clock
timeouts) and the simulator (`bench/sim.py`: messages delivered at once, copies timed by
its cost model). Neither decides anything about the protocol.

Source (`Outgoing`), request R on this instance:

    start ─▶ PREALLOC ─reply ok─▶ STAGING: Copy blocks [next_block, full) while R decodes;
               │                     │     the next stage once copied and acked
               │ R queued            │ few blocks left (≤ last_stage_blocks) or stage limit
               │                     ▼ WaitStepBoundary; then Pause, last Copy, Commit
               └──▶ Pause, Commit ─▶ COMMIT ─ack (and last copy done)─▶ Remove ─▶ COMMITTED
    any refusal, MigAbort, local cancel, timeout, transport failure ─▶ ABORTED:
        R resumed if paused; the destination told (MigAbort) unless it said so first

Destination (`Incoming`):

    prealloc ─▶ RESERVED: claim the cached leading blocks, reserve the rest + growth
                  │  MigStage: grow the reservation, Recv into it, MigStageAck (repeat)
                  │  MigCommit ─▶ Import (claimed + received blocks, the rest freed)
                  ▼
                COMMITTED ─R stepped here (or has no KV)─▶ MigCommitAck ─▶ DONE
                  (the source frees R's blocks only then: D may fail before)
    any MigAbort / timeout / failure ─▶ ABORTED: reservation released, claims dropped,
        an imported copy removed; the source told unless it said so first

Invariants:
- Source: blocks [0, next_block) of R's table are at the destination; the first
  num_blocks_skipped of them were cached there (dedup) and never copied. A stage copies
  only blocks of computed tokens, so the copy waits for no step in flight.
- Destination: R's block table there is
      logical block   0 .. k-1            k .. n-1
      block table     cached_block_ids    reservation[0 .. n-k-1]   (MigStage indices >= k)
  and its reservation covers `blocks_needed` (R's tokens plus GROWTH_BLOCKS blocks,
  never past its final length) as of the last stage announced.
- Every path to ABORTED frees what its side holds; R runs on exactly one side once the
  migration ends (after a late abort both may have run a while: the gateway drops
  duplicate token indices).
- Messages of one migration are handled in order; a MigCommit is handled after the
  last stage's blocks arrived.

Block accounting (claim, reserve, take, free) is done by the destination machine on the
engine's BlockManager directly: it is in-memory and its answers (a reservation can fail)
decide the next step. Everything else comes back as an op.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferry.common import wire
from ferry.common.config import MIGRATION_GROWTH_BLOCKS as GROWTH_BLOCKS
from ferry.services.worker.engine.block_manager import BlockManager
from ferry.services.worker.engine.request import Request, Status

__all__ = ["GROWTH_BLOCKS", "Outgoing", "Incoming", "blocks_needed"]


def blocks_needed(req: Request, block_size: int) -> int:
    """Blocks the destination should hold by now: R's tokens plus GROWTH_BLOCKS blocks of
    headroom for decoding during the next stage, never past R's final length."""
    final_len = len(req.prompt_token_ids) + req.sampling.max_tokens
    num_tokens = min(req.num_tokens + GROWTH_BLOCKS * block_size, final_len)
    return -(-num_tokens // block_size)


# ---- ops (what a driver runs) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    msg: Any  # to the peer's inbox


@dataclass(frozen=True, slots=True)
class Join:
    """Source: join the KV group the destination opened (MigPreallocReply)."""

    group_id: str
    store_addr: str


@dataclass(frozen=True, slots=True)
class Copy:
    """Source: send these blocks of R's table (pinned until sent), then `copied`."""

    stage_index: int
    block_ids: tuple[int, ...]
    final: bool  # R is paused: this is the last stage


@dataclass(frozen=True, slots=True)
class Recv:
    """Destination: receive a stage into these reserved blocks, then `received`."""

    stage_index: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WaitStepBoundary:
    """Source: call `step_boundary` right after the engine's next step (at once if idle)."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Source: take R out of the batch, its blocks kept."""

    at_step_boundary: bool  # False: R was queued (it has no step to end)


@dataclass(frozen=True, slots=True)
class Resume:
    """Source: R goes on here (if it is still here and paused)."""


@dataclass(frozen=True, slots=True)
class Commit:
    """Source: send MigCommit with R's exported state; with verify, a checksum of R's
    KV blocks [0, blocks_for(num_computed_tokens))."""

    verify: bool


@dataclass(frozen=True, slots=True)
class Import:
    """Destination: adopt R (state from MigCommit) with these blocks (owned: on failure
    call `import_failed`)."""

    state: wire.RequestState
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Remove:
    """R lives on the other side now: drop it here, emitting nothing (if still here)."""


@dataclass(frozen=True, slots=True)
class Done:
    """The migration ended (either side); the driver forgets it."""

    committed: bool
    reason: str


# ---- source -------------------------------------------------------------------------------


class Phase(enum.Enum):
    PREALLOC = "prealloc"
    STAGING = "staging"
    FINAL = "final"  # waiting for the step boundary to pause R
    COMMIT = "commit"
    COMMITTED = "committed"
    ABORTED = "aborted"


class Outgoing:
    """Source side of one migration. Every event takes R as the engine holds it now
    (None if gone): the machine checks it is still the request it started with."""

    def __init__(self, *, migration_id: str, req_id: str, src_instance_id: str,
                 src_inbox_addr: str, kv_block_bytes: int, block_size: int, stage_limit: int,
                 last_stage_blocks: int, verify_kv: bool = False) -> None:
        self.migration_id = migration_id
        self.req_id = req_id
        self.src_instance_id = src_instance_id
        self.src_inbox_addr = src_inbox_addr
        self.kv_block_bytes = kv_block_bytes
        self.block_size = block_size
        self.stage_limit = stage_limit  # stages before the final one
        self.last_stage_blocks = last_stage_blocks  # pause once at most this many remain
        self.verify_kv = verify_kv
        self.phase = Phase.PREALLOC
        self.num_stages = 0  # stages copied
        self.next_block = 0  # blocks [0, next_block) of R's table are at dst
        self.num_blocks_skipped = 0  # of those, cached there already (never copied)
        self.kv_verified = False  # a checksum went with the commit
        self.commit_ack: wire.MigCommitAck | None = None
        self.reason = ""
        self._req: Request | None = None
        self._paused = False
        self._waiting: set[str] = set()  # what the current step waits for: "copy", "ack"
        self._num_offered = 0  # prefix hashes sent with MigPrealloc
        self._stage_end = 0  # the stage being copied ends at this block

    @property
    def ended(self) -> bool:
        return self.phase in (Phase.COMMITTED, Phase.ABORTED)

    @property
    def num_blocks_copied(self) -> int:
        return self.next_block - self.num_blocks_skipped

    def start(self, req: Request | None, block_hashes: list[int], group_id: str) -> list:
        """Offer R to the destination: its blocks needed and its computed blocks' hashes."""
        if req is None or req.status not in (Status.RUNNING, Status.WAITING):
            return self._abort("request is not running here", notify_peer=False)
        self._req = req
        self._num_offered = len(block_hashes)
        return [Send(wire.MigPrealloc(
            migration_id=self.migration_id, req_id=req.req_id,
            src_instance_id=self.src_instance_id, src_inbox_addr=self.src_inbox_addr,
            num_blocks=blocks_needed(req, self.block_size), kv_block_bytes=self.kv_block_bytes,
            group_id=group_id, prompt_token_ids=req.prompt_token_ids,
            block_hashes=tuple(block_hashes)))]

    def message(self, msg: Any, req: Request | None) -> list:
        """A reply from the destination."""
        if self.ended:
            return []
        if isinstance(msg, wire.MigAbort):
            return self._abort(f"destination aborted: {msg.reason}", notify_peer=False)
        if isinstance(msg, wire.MigPreallocReply) and self.phase is Phase.PREALLOC:
            return self._prealloc_reply(msg, req)
        if isinstance(msg, wire.MigStageAck):
            if not msg.ok:
                what = "final stage" if self.phase is Phase.COMMIT else f"stage {msg.stage_index}"
                return self._abort(f"{what} failed: {msg.reason}", notify_peer=False)
            if self.phase is Phase.STAGING and "ack" in self._waiting:
                self._waiting.discard("ack")
                return self._after_stage(req)
            return []
        if isinstance(msg, wire.MigCommitAck) and self.phase is Phase.COMMIT:
            if not msg.ok:
                return self._abort(f"destination could not commit: {msg.reason}",
                                   notify_peer=False)
            self.commit_ack = msg
            self._waiting.discard("ack")
            return self._after_commit()
        return []

    def copied(self, req: Request | None) -> list:
        """The current stage's blocks were sent."""
        if self.ended or "copy" not in self._waiting:
            return []
        self._waiting.discard("copy")
        self.next_block = self._stage_end
        self.num_stages += 1
        if self.phase is Phase.COMMIT:
            return self._after_commit()
        return self._after_stage(req)

    def step_boundary(self, req: Request | None) -> list:
        """Right after an engine step, as WaitStepBoundary asked: pause R, send the rest
        and, without waiting, the commit (the destination handles it after the blocks)."""
        if self.phase is not Phase.FINAL:
            return []
        if (gone := self._gone(req)) is not None:
            return self._abort(gone)
        self._paused = True
        self.phase = Phase.COMMIT
        end = -(-req.num_computed_tokens // self.block_size)
        return [Pause(True), *self._stage(req, end, final=True), self._commit(req)]

    def cancel(self, reason: str) -> list:
        """This worker stops the migration (client abort of R, shutdown)."""
        return [] if self.ended else self._abort(reason)

    def timeout(self) -> list:
        return [] if self.ended else self._abort(f"timeout in phase {self.phase.value}")

    def failed(self, reason: str) -> list:
        """The transport failed (peer died, group broke)."""
        return [] if self.ended else self._abort(reason)

    # ---- internals ----------------------------------------------------------------------

    def _prealloc_reply(self, msg: wire.MigPreallocReply, req: Request | None) -> list:
        if not msg.ok:
            return self._abort(f"destination refused: {msg.reason}", notify_peer=False)
        if not 0 <= msg.num_cached_blocks <= self._num_offered:
            return self._abort(f"destination claims {msg.num_cached_blocks} cached blocks "
                               f"of {self._num_offered} offered")
        self.next_block = self.num_blocks_skipped = msg.num_cached_blocks
        self.phase = Phase.STAGING
        ops: list = [Join(msg.group_id, msg.store_addr)]
        if req is not None and req is self._req and req.status is Status.WAITING:
            self._paused = True  # queued: no KV to copy, just the state
            return [*ops, Pause(False), self._commit(req)]
        return ops + self._next(req)

    def _after_stage(self, req: Request | None) -> list:
        if self._waiting:
            return []
        return self._next(req)

    def _next(self, req: Request | None) -> list:
        """Another stage while R decodes, or the final one (at a step boundary)."""
        if self.num_stages < self.stage_limit:
            if (gone := self._gone(req)) is not None:
                return self._abort(gone)
            num_full = req.num_computed_tokens // self.block_size
            if num_full - self.next_block > self.last_stage_blocks:
                return self._stage(req, num_full, final=False)
        self.phase = Phase.FINAL
        return [WaitStepBoundary()]

    def _stage(self, req: Request, end_block: int, *, final: bool) -> list:
        first = self.next_block
        block_ids = tuple(req.block_ids[first:end_block])
        ops = [Send(wire.MigStage(
            migration_id=self.migration_id, stage_index=self.num_stages,
            first_block_index=first, num_blocks=len(block_ids),
            num_blocks_needed=blocks_needed(req, self.block_size))),
            Copy(self.num_stages, block_ids, final)]
        self._stage_end = end_block  # next_block once copied
        self._waiting = {"copy"} if final else {"copy", "ack"}
        return ops

    def _commit(self, req: Request) -> Commit:
        self.phase = Phase.COMMIT
        self._waiting.add("ack")
        verify = self.verify_kv and req.num_computed_tokens > 0
        self.kv_verified = verify
        return Commit(verify)

    def _after_commit(self) -> list:
        if self._waiting:
            return []
        self.phase = Phase.COMMITTED
        return [Remove(), Done(True, "")]

    def _gone(self, req: Request | None) -> str | None:
        if req is None or req is not self._req or req.status is Status.FINISHED:
            return "request finished during migration"
        if req.status is Status.WAITING:
            return "request was preempted during migration"
        return None

    def _abort(self, reason: str, *, notify_peer: bool = True) -> list:
        self.reason = reason
        ops: list = []
        if notify_peer:
            # Also after PREALLOC: the destination may have reserved before its reply was lost.
            ops.append(Send(wire.MigAbort(migration_id=self.migration_id, reason=reason)))
        if self._paused:
            ops.append(Resume())
        self.phase = Phase.ABORTED
        ops.append(Done(False, reason))
        return ops


# ---- destination --------------------------------------------------------------------------


class InPhase(enum.Enum):
    OFFERED = "offered"  # MigPrealloc handled, the reply not sent yet
    RESERVED = "reserved"
    COMMITTED = "committed"  # imported; waiting for its first step here
    DONE = "done"
    ABORTED = "aborted"


class Incoming:
    """Destination side of one migration. `kv_checksum(block_ids)` (verify mode) reads the
    received KV; None where no commit carries a checksum."""

    def __init__(self, msg: wire.MigPrealloc, blocks: BlockManager,
                 kv_checksum: Callable[[list[int]], int] | None = None) -> None:
        self.migration_id = msg.migration_id
        self.req_id = msg.req_id
        self.prealloc = msg
        self.blocks = blocks
        self.kv_checksum = kv_checksum
        self.phase = InPhase.OFFERED
        # Cached blocks holding R's first blocks, claimed (one reference each) until the
        # commit hands them to R, or an abort frees them.
        self.cached_block_ids: list[int] = []
        self.num_computed_at_import = 0
        self.reason = ""

    @property
    def ended(self) -> bool:
        return self.phase in (InPhase.DONE, InPhase.ABORTED)

    def reserve(self) -> list:
        """Claim the leading blocks cached here (never sent), reserve the rest plus growth.
        Returns a refusal, or [] and the driver opens the KV group and calls `opened`."""
        msg, blocks = self.prealloc, self.blocks
        cached = blocks.match(list(msg.block_hashes))
        blocks.claim(cached)
        if not blocks.reserve(self.migration_id, max(0, msg.num_blocks - len(cached))):
            blocks.free(cached)
            return self._refuse(f"no memory: {msg.num_blocks} blocks asked ({len(cached)} "
                                f"cached), {blocks.num_available} available")
        self.cached_block_ids = cached
        return []

    def opened(self, group_id: str, store_addr: str) -> list:
        self.phase = InPhase.RESERVED
        return [Send(wire.MigPreallocReply(
            migration_id=self.migration_id, ok=True, reason="", group_id=group_id,
            store_addr=store_addr, num_cached_blocks=len(self.cached_block_ids)))]

    def open_failed(self, reason: str) -> list:
        self._release()
        return self._refuse(f"no KV group: {reason}")

    def message(self, msg: Any) -> list:
        """MigStage, MigCommit or MigAbort from the source (in order)."""
        if self.ended:
            return []
        if isinstance(msg, wire.MigAbort):
            return self._abort(msg.reason, tell_source=False)
        if self.phase is not InPhase.RESERVED:
            return []
        if isinstance(msg, wire.MigStage):
            return self._stage(msg)
        if isinstance(msg, wire.MigCommit):
            return self._commit(msg)
        return []

    def received(self, stage_index: int) -> list:
        """A stage's blocks arrived."""
        if self.ended:
            return []
        return [Send(wire.MigStageAck(migration_id=self.migration_id, stage_index=stage_index,
                                      ok=True, reason=""))]

    def stepped(self, resumed_s: float, first_token_s: float) -> list:
        """R has stepped here since its import (or ended): ack the commit. resumed_s:
        that step's start; first_token_s: its end (wall clock, for the source's downtime)."""
        if self.phase is not InPhase.COMMITTED:
            return []
        return self._ack(resumed_s, first_token_s)

    def import_failed(self, block_ids: tuple[int, ...], reason: str) -> list:
        """Import raised: the blocks it was given are freed (R's only once imported)."""
        self.blocks.free(list(block_ids))
        self.phase = InPhase.RESERVED  # nothing imported
        return self._abort(reason, tell_source=True)

    def timeout(self) -> list:
        if self.ended:
            return []
        if self.phase is InPhase.COMMITTED:
            return self._abort("request did not step after import", tell_source=True)
        return self._abort(f"timeout in phase {self.phase.value}", tell_source=True)

    def failed(self, reason: str) -> list:
        """The transport failed."""
        return [] if self.ended else self._abort(reason, tell_source=True)

    # ---- internals ----------------------------------------------------------------------

    def _stage(self, msg: wire.MigStage) -> list:
        blocks = self.blocks
        num_cached = len(self.cached_block_ids)
        missing = msg.num_blocks_needed - num_cached - len(blocks.reserved(self.migration_id))
        if missing > 0 and not blocks.reserve(self.migration_id, missing):
            return self._abort("no memory to grow the reservation", tell_source=True)
        reserved = blocks.reserved(self.migration_id)
        start = msg.first_block_index - num_cached  # index in the reservation
        end = start + msg.num_blocks
        if start < 0 or end > len(reserved):
            return self._abort(f"stage covers blocks [{msg.first_block_index}, "
                               f"{end + num_cached}): {num_cached} cached here, "
                               f"{len(reserved)} reserved", tell_source=True)
        return [Recv(msg.stage_index, tuple(reserved[start:end]))]

    def _commit(self, msg: wire.MigCommit) -> list:
        state, blocks = msg.state, self.blocks
        num_new = blocks.blocks_for(state.num_computed_tokens) - len(self.cached_block_ids)
        if num_new > len(blocks.reserved(self.migration_id)):
            return self._abort("commit needs more blocks than were received", tell_source=True)
        if num_new < 0:
            return self._abort("commit has fewer blocks than were cached here", tell_source=True)
        if msg.kv_checksum is not None:
            held = self.cached_block_ids + blocks.reserved(self.migration_id)[:num_new]
            received = self.kv_checksum(held) if self.kv_checksum else None
            if received != msg.kv_checksum:
                return self._abort(f"KV checksum mismatch ({received} != {msg.kv_checksum})",
                                   tell_source=True)
        block_ids = tuple(self.cached_block_ids + blocks.take_reserved(self.migration_id, num_new))
        self.cached_block_ids = []
        self.num_computed_at_import = state.num_computed_tokens
        self.phase = InPhase.COMMITTED
        ops: list = [Import(state, block_ids)]
        if state.num_computed_tokens == 0:  # a queued request: nothing to wait for
            ops += self._ack(0.0, 0.0)
        return ops

    def _ack(self, resumed_s: float, first_token_s: float) -> list:
        self.phase = InPhase.DONE
        return [Send(wire.MigCommitAck(migration_id=self.migration_id, ok=True, reason="",
                                       resumed_s=resumed_s, first_token_s=first_token_s)),
                Done(True, "")]

    def _release(self) -> None:
        self.blocks.release_reservation(self.migration_id)
        self.blocks.free(self.cached_block_ids)
        self.cached_block_ids = []

    def _refuse(self, reason: str) -> list:
        """Before the reply: answer MigPreallocReply(ok=False)."""
        self.reason = reason
        self.phase = InPhase.ABORTED
        return [Send(wire.MigPreallocReply(migration_id=self.migration_id, ok=False,
                                           reason=reason, group_id="", store_addr="")),
                Done(False, reason)]

    def _abort(self, reason: str, *, tell_source: bool) -> list:
        self._release()
        ops: list = []
        if self.phase in (InPhase.COMMITTED, InPhase.DONE):
            ops.append(Remove())  # the source resumed R: drop our copy, emitting nothing
        if tell_source:
            ops.append(Send(wire.MigAbort(migration_id=self.migration_id, reason=reason)))
        self.reason = reason
        self.phase = InPhase.ABORTED
        return [*ops, Done(False, reason)]
