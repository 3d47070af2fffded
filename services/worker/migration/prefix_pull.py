"""Prefix pulls (DESIGN §6): this worker copies a request's cached prefix blocks from the
peer that holds them before queueing the request, instead of computing them again.

The scheduler sends PullPrefix (the request's Dispatch, the source, the prefix's block
hashes) to the chosen destination D; D runs an IncomingPull, the source S an OutgoingPull:

    D                                              S
    claim own leading cached blocks (k),
    reserve the rest          ── PrefixFetch ─▶    claim its cached run of [k, n) (pinned)
    open the KV group S -> D  ◀─ PrefixOffer ──    (its current group id)
                              ── PrefixAccept ─▶   join the group
    post the receives         ◀─ PrefixSend ───    send the blocks, unpin
    register them as cached (hashes known), free them (evictable), queue the request

Whatever happens (S evicted the blocks, is busy, died, is slow; D out of memory) D queues
the request: it finds what arrived in its cache and computes the rest. D bounds each wait
by `prefix_pull_timeout_s`; a receive already posted keeps its blocks reserved until the
transport lets go of them (never handed out while a late copy may still write them), but
the request does not wait for it. Both sides hold the blocks they read or write pinned
(claimed, or reserved) for the whole copy, so nothing else can take them meanwhile.

Transfers share the pairwise group with migrations (one group per direction): S announces
each send with a control message right before submitting it, and D posts its receive in
the order the announcements arrive, from a task woken in that order (as a migration's
stages are), so sends and receives pair up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.common import wire
from ferry.common.config import WorkerConfig
from ferry.common.logging import get_logger
from ferry.services.worker.engine.engine import Engine

PULL_MESSAGES = (wire.PrefixFetch, wire.PrefixOffer, wire.PrefixAccept, wire.PrefixSend,
                 wire.PullAbort)


class PullFailed(Exception):
    def __init__(self, reason: str, *, tell_peer: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tell_peer = tell_peer


@dataclass(slots=True)
class IncomingPull:
    msg: wire.PullPrefix
    inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=8))
    started_s: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the request was aborted meanwhile: do not queue it
    queued: bool = False  # the request went to the engine (or was dropped)
    own_block_ids: list[int] = field(default_factory=list)  # cached here, claimed meanwhile
    num_cached_blocks: int = 0  # of the blocks asked for, those cached here already
    num_blocks: int = 0  # copied
    num_bytes: int = 0
    copy_s: float = 0.0

    @property
    def req_id(self) -> str:
        return self.msg.dispatch.req_id


@dataclass(slots=True)
class OutgoingPull:
    msg: wire.PrefixFetch
    src_inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=8))


class PrefixPulls:
    """Both sides of this worker's prefix pulls. `run_dispatch(dispatch)` queues a request
    (the worker's Dispatch handler); `send(addr, msg)` is the control channel; `kv` the
    KV transport shared with migrations, `group_locks` their per-destination locks (held
    from naming a group to joining it)."""

    def __init__(
        self,
        *,
        config: WorkerConfig,
        engine: Engine,
        kv: Any,
        send: Callable[[str, Any], None],
        run_dispatch: Callable[[wire.Dispatch], None],
        group_locks: dict[str, asyncio.Lock],
    ) -> None:
        self.config = config
        self.engine = engine
        self.kv = kv
        self.send = send
        self.run_dispatch = run_dispatch
        self.group_locks = group_locks
        self.timeout_s = config.prefix_pull_timeout_s
        self.log = get_logger(instance_id=config.instance_id)
        self.incoming: dict[str, IncomingPull] = {}  # pull_id -> pull (until its copy ends)
        self.outgoing: dict[str, OutgoingPull] = {}
        self.num_ok = 0
        self.num_failed = 0
        self._tasks: set[asyncio.Task] = set()
        self._handlers: dict[type, Callable[[Any], None]] = {
            wire.PrefixFetch: self.handle_fetch,
            wire.PrefixOffer: self._to_incoming,
            wire.PrefixAccept: self._to_outgoing,
            wire.PrefixSend: self._to_incoming,
            wire.PullAbort: self.handle_abort,
        }

    def handle(self, msg: Any) -> None:
        """Entry point for every message in PULL_MESSAGES."""
        self._handlers[type(msg)](msg)

    def req_ids(self) -> list[str]:
        """Requests waiting for their pull here (held by this instance, not yet queued)."""
        return [p.req_id for p in self.incoming.values() if not p.queued]

    def waiting(self, req_id: str) -> IncomingPull | None:
        for pull in self.incoming.values():
            if pull.req_id == req_id and not pull.queued:
                return pull
        return None

    def cancel(self, req_id: str) -> bool:
        """Forget the request of a pull in progress (aborted, its gateway gone); the copy
        itself goes on into the cache. True if there was one."""
        pull = self.waiting(req_id)
        if pull is not None:
            pull.cancelled = True
        return pull is not None

    # ---- destination ----------------------------------------------------------------------

    def start(self, msg: wire.PullPrefix) -> None:
        pull = IncomingPull(msg)
        if msg.pull_id in self.incoming or len(self.incoming) >= self.config.max_prefix_pulls:
            pull.queued = True
            self.run_dispatch(msg.dispatch)
            return self._report(pull, "too many pulls into this instance" if msg.pull_id
                                not in self.incoming else "duplicate pull id")
        self.incoming[msg.pull_id] = pull
        self._spawn(self._run_incoming(pull))

    async def _run_incoming(self, pull: IncomingPull) -> None:
        msg, blocks = pull.msg, self.engine.blocks
        reason = ""
        try:
            await self._pull(pull)
        except PullFailed as err:
            reason = err.reason
            if err.tell_peer:
                self.send(msg.src_inbox_addr, wire.PullAbort(pull_id=msg.pull_id, reason=reason))
        except TimeoutError:
            reason = "timeout: no answer from the source"
            self.send(msg.src_inbox_addr, wire.PullAbort(pull_id=msg.pull_id, reason=reason))
        except Exception as exc:  # transport failures: peer died, group broke
            reason = f"{type(exc).__name__}: {exc}"
            self.send(msg.src_inbox_addr, wire.PullAbort(pull_id=msg.pull_id, reason=reason))
        finally:
            blocks.release_reservation(msg.pull_id)
            blocks.free(pull.own_block_ids[::-1])  # tail first out of the cache (LRU)
            pull.own_block_ids = []
            self.incoming.pop(msg.pull_id, None)
            self._queue(pull)
            self._report(pull, reason)

    async def _pull(self, pull: IncomingPull) -> None:
        msg, blocks = pull.msg, self.engine.blocks
        hashes = list(msg.block_hashes)
        # Pinned while the rest arrives: the chain stays findable from its first block.
        pull.own_block_ids = blocks.match(hashes)
        blocks.claim(pull.own_block_ids)
        first = pull.num_cached_blocks = len(pull.own_block_ids)
        if first >= len(hashes):
            return  # cached here already (an earlier pull, a request since)
        if not blocks.reserve(msg.pull_id, len(hashes) - first):
            raise PullFailed(f"no memory for {len(hashes) - first} blocks", tell_peer=False)
        self.send(msg.src_inbox_addr, wire.PrefixFetch(
            pull_id=msg.pull_id, dst_instance_id=self.config.instance_id,
            dst_inbox_addr=self.config.inbox.advertise, block_hashes=tuple(hashes),
            first_block=first, kv_block_bytes=self.kv.block_bytes))
        offer = await self._reply(pull, wire.PrefixOffer)
        if offer.num_blocks <= 0:
            raise PullFailed(f"source has none: {offer.reason}", tell_peer=False)
        if offer.num_blocks > len(hashes) - first:
            raise PullFailed(f"source offers {offer.num_blocks} blocks, "
                             f"{len(hashes) - first} asked")
        group_id, store_addr = self.kv.open_receiving(msg.src_instance_id, offer.group_id)
        self.send(msg.src_inbox_addr, wire.PrefixAccept(pull_id=msg.pull_id, group_id=group_id,
                                                        store_addr=store_addr))
        announce = await self._reply(pull, wire.PrefixSend)
        # The announcement says what is on its way: receive exactly that (a send without
        # its receive would hold up the group until the transport's timeout).
        target = blocks.reserved(msg.pull_id)[:announce.num_blocks]
        if len(target) != announce.num_blocks:
            raise PullFailed(f"source sends {announce.num_blocks} blocks, {len(target)} "
                             "reserved here")
        start = time.perf_counter()
        recv = self.kv.post_recv(group_id, target)  # posted before anything else runs
        done, _ = await asyncio.wait({recv}, timeout=self.timeout_s)
        if not done:  # the request goes on without the copy; the reservation waits for it
            self._queue(pull)
        pull.num_bytes = await recv
        pull.copy_s = time.perf_counter() - start
        received = blocks.take_reserved(msg.pull_id, announce.num_blocks)
        for block_id, block_hash in zip(received, hashes[first:], strict=False):
            blocks.register(block_id, block_hash)
        pull.num_blocks = len(received)
        blocks.free(received[::-1])  # cached and idle now: the request claims them
        if not done:
            raise PullFailed(f"copy took over {self.timeout_s:.1f}s: queued without it",
                             tell_peer=False)

    async def _reply(self, pull: IncomingPull, kind: type) -> Any:
        while True:
            msg = await asyncio.wait_for(pull.inbox.get(), self.timeout_s)
            if isinstance(msg, wire.PullAbort):
                raise PullFailed(f"source aborted: {msg.reason}", tell_peer=False)
            if isinstance(msg, kind):
                return msg

    def _queue(self, pull: IncomingPull) -> None:
        if pull.queued:
            return
        pull.queued = True
        if not pull.cancelled:
            self.run_dispatch(pull.msg.dispatch)

    def _report(self, pull: IncomingPull, reason: str) -> None:
        msg = pull.msg
        if reason:
            self.num_failed += 1
        else:
            self.num_ok += 1
        self.log.info("prefix_pull", req_id=pull.req_id, pull_id=msg.pull_id,
                      src_instance_id=msg.src_instance_id, ok=not reason, reason=reason,
                      num_blocks=pull.num_blocks, copy_s=round(pull.copy_s, 6))
        self.send(self.config.scheduler_addr, wire.PullDone(
            pull_id=msg.pull_id, req_id=pull.req_id, src_instance_id=msg.src_instance_id,
            dst_instance_id=self.config.instance_id, ok=not reason, reason=reason,
            num_blocks=pull.num_blocks, num_cached_blocks=pull.num_cached_blocks,
            num_bytes=pull.num_bytes, copy_s=pull.copy_s,
            total_s=time.perf_counter() - pull.started_s))

    def _to_incoming(self, msg: Any) -> None:
        pull = self.incoming.get(msg.pull_id)
        if pull is not None and not pull.inbox.full():
            pull.inbox.put_nowait(msg)

    # ---- source ---------------------------------------------------------------------------

    def handle_fetch(self, msg: wire.PrefixFetch) -> None:
        reason = None
        if len(self.outgoing) >= self.config.max_prefix_pulls:
            reason = "too many pulls out of this instance"
        elif msg.kv_block_bytes != self.kv.block_bytes:
            reason = f"KV block size differs ({msg.kv_block_bytes} vs {self.kv.block_bytes} bytes)"
        elif msg.pull_id in self.outgoing:
            reason = "duplicate pull id"
        if reason is not None:
            self.send(msg.dst_inbox_addr, wire.PrefixOffer(pull_id=msg.pull_id, num_blocks=0,
                                                           reason=reason, group_id=None))
            return
        pull = self.outgoing[msg.pull_id] = OutgoingPull(msg)
        self._spawn(self._run_outgoing(pull))

    async def _run_outgoing(self, pull: OutgoingPull) -> None:
        msg, blocks = pull.msg, self.engine.blocks
        pinned: list[int] = []
        try:
            async with self.group_locks.setdefault(msg.dst_instance_id, asyncio.Lock()):
                # Its cached run, pinned (claimed) for the read; evicted ones end it.
                pinned = blocks.match(list(msg.block_hashes))[msg.first_block:]
                blocks.claim(pinned)
                self.send(msg.dst_inbox_addr, wire.PrefixOffer(
                    pull_id=msg.pull_id, num_blocks=len(pinned),
                    reason="" if pinned else "not cached here (evicted)",
                    group_id=self.kv.sending_group_id(msg.dst_instance_id)))
                if not pinned:
                    return
                accept = await self._src_reply(pull, wire.PrefixAccept)
                self.kv.join_sending(msg.dst_instance_id, accept.group_id, accept.store_addr)
            # Announce, then submit the send at once (no await in between): D posts its
            # receive in the order of the announcements.
            self.send(msg.dst_inbox_addr, wire.PrefixSend(pull_id=msg.pull_id,
                                                          num_blocks=len(pinned)))
            await self.kv.send(msg.dst_instance_id, pinned)
        except PullFailed:
            pass  # the destination ended it
        except TimeoutError:
            self.send(msg.dst_inbox_addr, wire.PullAbort(
                pull_id=msg.pull_id, reason="timeout: no answer from the destination"))
        except Exception as exc:  # transport failure
            self.send(msg.dst_inbox_addr, wire.PullAbort(
                pull_id=msg.pull_id, reason=f"{type(exc).__name__}: {exc}"))
        finally:
            blocks.free(pinned)
            self.outgoing.pop(msg.pull_id, None)

    async def _src_reply(self, pull: OutgoingPull, kind: type) -> Any:
        while True:
            msg = await asyncio.wait_for(pull.src_inbox.get(), self.timeout_s)
            if isinstance(msg, wire.PullAbort):
                raise PullFailed(msg.reason)
            if isinstance(msg, kind):
                return msg

    def _to_outgoing(self, msg: Any) -> None:
        pull = self.outgoing.get(msg.pull_id)
        if pull is not None and not pull.src_inbox.full():
            pull.src_inbox.put_nowait(msg)

    def handle_abort(self, msg: wire.PullAbort) -> None:
        """PullAbort goes to whichever side holds the pull id."""
        if msg.pull_id in self.incoming:
            self._to_incoming(msg)
        else:
            self._to_outgoing(msg)

    # ---- both -----------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
