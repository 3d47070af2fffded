"""The scheduler's state and decisions, without sockets or an event loop (STYLE 5).

Entry points take a decoded message (or nothing) and `now`, monotonic seconds, and return
what to send as `(address, message)` pairs; `services/scheduler/main.py` sends them. The
state: the instance table (loads), the placement table (req_id -> holder), the
migrations in flight, the gateways seen, and counters for `ferry status`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

from ferry.common.config import DEFAULT_BLOCK_SIZE, SchedulerConfig
from ferry.common.logging import get_logger
from ferry.common.wire import (
    Abort,
    CacheSnapshotRequest,
    Dispatch,
    DispatchRejected,
    GatewayGone,
    InstanceAddr,
    InstanceDown,
    InstanceStatus,
    InstanceView,
    Leaving,
    LoadFields,
    LoadReport,
    MigrateOut,
    MigrationDone,
    Placement,
    Priority,
    PullDone,
    PullPrefix,
    Register,
    Release,
    RequestPlacement,
    ReRegister,
    SetDraining,
    StatusReply,
)
from ferry.services.scheduler.dispatch import (
    Choice,
    Demand,
    Ferry,
    Infaas,
    LeastLoad,
    PrefixAffinity,
    make_dispatch_policy,
)
from ferry.services.scheduler.load import (
    demand_blocks,
    dispatch_room,
    empty_load,
    freeness,
    migration_room,
    to_wire,
)
from ferry.services.scheduler.migration import MigrationDecision, MigrationHook, pair_migrations
from ferry.services.scheduler.pending import PendingEntry, PendingQueue
from ferry.services.scheduler.prefix_index import PrefixIndex
from ferry.services.scheduler.table import Instance, InstanceTable, UnseenDispatch

Out = list[tuple[str, Any]]  # (peer inbox address, wire message)

# Requests an instance may have queued (estimated) before dispatch skips it; when every
# instance is past it the gateway gets 429. Matches EngineConfig.max_waiting.
MAX_GATEWAYS = 256  # gateway addresses remembered (least recently seen forgotten first)
MAX_ABORT_REASONS = 64  # distinct abort reasons counted; the rest count as "other"
MAX_RECENTLY_RELEASED = 16_384  # released req_ids remembered (see migration_done)
MIGRATION_LOST_AFTER_S = 120.0  # no MigrationDone this long after MigrateOut: count it lost
DEAD_SHOWN_S = 30.0  # a dead instance stays in `ferry status` this long (alive=False)
# Dead instances remembered past that (at most MAX_TOMBSTONES, for TOMBSTONE_S): one that
# comes back later still has to drop the requests replayed elsewhere.
TOMBSTONE_S = 3600.0
MAX_TOMBSTONES = 4096
# Reconciling a worker's list of the requests it holds (LoadReport.req_ids): an entry
# here that the list has left out twice, placed at least this long ago, is a phantom.
PHANTOM_MIN_AGE_S = 2.0
# Inbox addresses of departed instances kept for `take_departed` (the process takes them
# after every call; the bound matters only to callers that never do: tests, the simulator).
MAX_DEPARTED = 1024

log = get_logger()


class SchedulerError(Exception):
    """A command that cannot be carried out; `code` follows HTTP (404 unknown, 409 conflict)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class HeldReq:
    instance_id: str  # the instance holding the request now
    priority: int
    gateway_addr: str | None  # its gateway's inbox; None when adopted from a Register
    since_s: float = 0.0  # when it was placed on instance_id (or adopted there)
    missing: bool = False  # the holder's last list of its requests left it out


@dataclass(slots=True)
class GatewaySeen:
    req_id_prefix: str  # of the gateway process at this inbox ("" until its first hello)
    last_seen_s: float


@dataclass(frozen=True, slots=True)
class Pending:
    """dispatch's answer for a request held in the pending queue (hold_until_room): it
    comes out of `release_pending` later, with the payload it was held with."""

    req_id: str


@dataclass(frozen=True, slots=True)
class Released:
    """A pending request now placed on instance_id: forward it there."""

    instance_id: str
    req: Dispatch
    payload: Any


@dataclass(frozen=True, slots=True)
class InFlightMigration:
    migration_id: str
    src_instance_id: str
    dst_instance_id: str
    req_id: str | None  # None: the source picks
    started_s: float


@dataclass(frozen=True, slots=True)
class PullPlan:
    """A placed request whose prefix its instance copies first (PullPrefix)."""

    src_instance_id: str
    block_hashes: tuple[int, ...]  # the leading blocks to hold there


@dataclass(slots=True)
class Counters:
    num_dispatched: int = 0
    num_rejected: int = 0  # DispatchRejected sent
    num_migrations_started: int = 0  # MigrateOut issued
    num_committed: int = 0  # migrations
    num_cached_blocks_placed: int = 0  # prefix blocks requests found where they were placed
    num_aborted: int = 0
    abort_reasons: dict[str, int] = field(default_factory=dict)
    instances_down: dict[str, int] = field(default_factory=dict)  # reason -> instances
    gateways_gone: dict[str, int] = field(default_factory=dict)  # reason -> gateways
    num_pulls: int = 0  # PullPrefix sent
    num_pulls_ok: int = 0
    num_pulls_failed: int = 0
    num_pull_blocks: int = 0  # KV blocks pulls copied
    pull_fail_reasons: dict[str, int] = field(default_factory=dict)

    def count_abort(self, reason: str) -> None:
        self.num_aborted += 1
        _count(self.abort_reasons, reason)

    def count_pull(self, msg: PullDone) -> None:
        self.num_pull_blocks += msg.num_blocks
        if msg.ok:
            self.num_pulls_ok += 1
        else:
            self.num_pulls_failed += 1
            _count(self.pull_fail_reasons, msg.reason)


def _count(reasons: dict[str, int], reason: str) -> None:
    key = reason[:80] or "unknown"
    if key not in reasons and len(reasons) >= MAX_ABORT_REASONS:
        key = "other"
    reasons[key] = reasons.get(key, 0) + 1


class SchedulerCore:
    def __init__(
        self,
        cfg: SchedulerConfig,
        *,
        epoch: str,
        started_s: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.epoch = epoch  # changes on every scheduler start
        self.started_s = started_s  # monotonic; views wait cfg.startup_grace_s after it
        self.table = InstanceTable()
        self.dispatch_policy = make_dispatch_policy(
            cfg.dispatch_policy, headroom_blocks=cfg.high_priority_headroom_blocks,
            kv_bandwidth_bytes_s=cfg.kv_bandwidth_bytes_s if cfg.prefix_pull else 0.0,
        )
        self.pulls: dict[str, PullPlan] = {}  # req_id -> its pull, until forwarded
        self._pull_numbers = itertools.count()
        self.reqs: dict[str, HeldReq] = {}  # req_id -> holder, for every request in flight
        self.migrations: dict[str, InFlightMigration] = {}  # migration_id -> migration
        self.gateways: dict[str, GatewaySeen] = {}  # inbox -> gateway, least recently seen first
        self.recently_released: dict[str, None] = {}
        self.dead_since: dict[str, float] = {}  # instance_id -> when it was declared dead
        self.tombstones: dict[str, float] = {}  # instance_id -> declared dead, past DEAD_SHOWN_S
        # Instances being emptied (`ferry drain`, a worker stopping): draining, and every
        # request they hold is migrated away, whatever the dispatch policy.
        self.evacuating: set[str] = set()
        self.prefix_index = PrefixIndex()  # which instance caches which prefix block
        self.snapshot_asked_s: dict[str, float] = {}  # instance -> CacheSnapshotRequest sent
        self.reregister_sent_s: dict[str, float] = {}  # instance_id -> last ReRegister sent
        # Inboxes of instances declared dead or stopped since `take_departed` last ran
        self.departed: deque[str] = deque(maxlen=MAX_DEPARTED)
        self.counters = Counters()
        self._migration_numbers = itertools.count()
        self.pending = (
            PendingQueue(capacity=cfg.max_pending, window=cfg.pending_window,
                         max_wait_s=cfg.pending_max_wait_s)
            if cfg.hold_until_room else None
        )
        # The periodic migration policy (DESIGN §5), None for the placement-only baselines;
        # its decisions, like `ferry migrate`'s, go through `migrate`'s checks.
        self.migration_policy: MigrationHook | None = None
        placement_only = (LeastLoad.name, Infaas.name, PrefixAffinity.name)  # baselines
        if cfg.enable_migration and cfg.dispatch_policy not in placement_only:
            margin = (
                cfg.migrate_margin
                if cfg.migrate_margin is not None
                else max(1.0, cfg.migrate_out_threshold)
            )
            self.migration_policy = (
                partial(
                    pair_migrations,
                    threshold=cfg.migrate_out_threshold,
                    margin=margin,
                    max_per_instance=cfg.max_migrations_per_instance,
                    headroom_blocks=cfg.high_priority_headroom_blocks,
                )
            )

    # ---- gateway -> scheduler -----------------------------------------------------------

    def in_grace(self, now: float) -> bool:
        """Just started: the table may not hold every live instance yet."""
        return now - self.started_s < self.cfg.startup_grace_s

    def see_gateway(self, addr: str, now: float, req_id_prefix: str = "") -> Out:
        """A gateway lives (any message of it; its GatewayHello gives its req_id_prefix).
        A new one gets the instance view at once (after the start-up grace); a new prefix
        at a known inbox means that gateway restarted: its old requests are orphans."""
        seen = self.gateways.pop(addr, None)
        out: Out = []
        if seen is None:
            seen = GatewaySeen(req_id_prefix, now)
            if not self.in_grace(now):
                out.append((addr, self.instance_view()))
        elif req_id_prefix and req_id_prefix != seen.req_id_prefix:
            if seen.req_id_prefix:
                out += self._gateway_gone(addr, seen.req_id_prefix, reason="restarted")
            seen.req_id_prefix = req_id_prefix
        seen.last_seen_s = now
        self.gateways[addr] = seen
        while len(self.gateways) > MAX_GATEWAYS:
            del self.gateways[next(iter(self.gateways))]
        return out

    def _gateway_gone(self, addr: str, req_id_prefix: str, *, reason: str) -> Out:
        """Forget a dead gateway's requests; its workers drop them (GatewayGone)."""
        orphans = [r for r, h in self.reqs.items()
                   if h.gateway_addr == addr and r.startswith(req_id_prefix)]
        for req_id in orphans:
            del self.reqs[req_id]
        if self.pending is not None:
            for req_id in self.pending.req_ids():
                if req_id.startswith(req_id_prefix):
                    self.pending.remove(req_id)
        log.warning("gateway_gone", gateway_inbox=addr, reason=reason, num_reqs=len(orphans))
        self.counters.gateways_gone[reason] = self.counters.gateways_gone.get(reason, 0) + 1
        gone = GatewayGone(inbox_addr=addr, req_id_prefix=req_id_prefix)
        return [(inst.inbox_addr, gone) for inst in self.table if inst.alive]

    def dispatch(
        self, req: Dispatch, *, now: float = 0.0, payload: Any = None
    ) -> str | DispatchRejected | Pending:
        """Choose an instance for req and count it into that instance's load at once.
        The caller forwards req's frames to the instance (or calls `undo_dispatch`).
        With hold_until_room, a request no open instance has room to start is held
        instead (`Pending`; payload comes back with it from `release_pending`). A request
        already placed or held is ignored (also answered `Pending`: nothing to send)."""
        if req.req_id in self.reqs or (self.pending is not None and req.req_id in self.pending):
            # Sent twice (a gateway re-dispatching what a scheduler restart might have
            # lost, racing the restart): it is placed or held already; forwarding it again
            # would start it twice.
            log.info("dispatch_duplicate_ignored", req_id=req.req_id)
            return Pending(req.req_id)
        open_ = self._open_instances()
        if isinstance(open_, tuple) and self.pending is not None and self.in_grace(now) \
                and not self.pending.is_full:
            # Just restarted: the instances are re-registering; hold it until one has room
            # (its demand in the workers' default block size: none has told its own yet).
            need = demand_blocks(req.prompt_len, DEFAULT_BLOCK_SIZE)
            self.pending.add(PendingEntry(req.req_id, need, now, (req, payload),
                                          priority=req.priority))
            return Pending(req.req_id)
        if isinstance(open_, tuple):
            return self._reject(req, *open_)
        if self.pending is not None:
            need = self._demand_blocks(req, open_)
            roomy = self._with_room(open_, need, self._demand(req, open_).cached_blocks)
            if not roomy:
                if self.pending.is_full:
                    return self._reject(req, 429, "overloaded: the pending queue is full")
                self.pending.add(PendingEntry(req.req_id, need, now, (req, payload),
                                              priority=req.priority))
                return Pending(req.req_id)
            open_ = roomy
        return self._place(req, open_, now)

    def release_pending(self, now: float) -> tuple[list[Released], Out]:
        """Place the pending requests that now fit (first fit in arrival order, high
        priority first; `PendingQueue.next_release`) or waited pending_max_wait_s; call
        after each load report (what changes an instance's room here) and periodically.
        Returns the placements to forward, and rejections for requests that waited their
        longest with no instance open."""
        placed: list[Released] = []
        out: Out = []
        while self.pending:
            open_ = self._open_instances()
            best_room = -1 if isinstance(open_, tuple) else self._best_room(open_)
            entry = self.pending.next_release(best_room, now)
            if entry is None:
                break
            req, payload = entry.payload
            if isinstance(open_, tuple):
                out.append((req.reply_addr, self._reject(req, *open_)))
                continue
            # Among the instances with room for it (none when it waited its longest).
            cached = self._demand(req, open_).cached_blocks
            roomy = self._with_room(open_, entry.demand_blocks, cached) or open_
            placed.append(Released(self._place(req, roomy, now), req, payload))
        return placed, out

    def _open_instances(self) -> dict[str, LoadFields] | tuple[int, str]:
        """The loads of the instances that may take a request, or (code, reason) if none."""
        serving = self.table.loads(serving_only=True)
        if not serving:
            return 503, "no live instance"
        open_ = {
            i: load
            for i, load in serving.items()
            if load.num_waiting < self.cfg.max_queued_per_instance
        }
        if not open_:
            return 429, "overloaded: every instance's queue is full"
        return open_

    def _best_room(self, loads: dict[str, LoadFields]) -> int:
        headroom = self.cfg.high_priority_headroom_blocks
        return max(dispatch_room(load, headroom_blocks=headroom) for load in loads.values())

    def _with_room(self, loads: dict[str, LoadFields], need: int,
                   cached: Mapping[str, int] = MappingProxyType({})) -> dict[str, LoadFields]:
        """The instances that could start a request of `need` blocks now (less the blocks
        of its prefix each caches): the policy chooses among these, so a request placed
        for room lands where the room is."""
        headroom = self.cfg.high_priority_headroom_blocks
        return {i: load for i, load in loads.items()
                if dispatch_room(load, headroom_blocks=headroom) >= need - cached.get(i, 0)}

    def _demand(self, req: Dispatch, loads: Mapping[str, LoadFields]) -> Demand:
        """What the policy knows of req: its length, and the leading blocks of its prefix
        each candidate caches (the prefix index, from the workers' reports); for prefix
        pulls, the same for every live instance of the candidates' block size (a busy or
        full one may be a pull's source), and the bytes of one block."""
        block_size = min(self.table[i].block_size for i in loads)
        hashes = list(req.prefix_hashes)
        if not hashes:
            return Demand(num_tokens=req.prompt_len, block_size=block_size)
        live = [i for i in self.table if i.alive and i.block_size == block_size]
        held = self.prefix_index.hits(hashes, [i.instance_id for i in live] + list(loads))
        return Demand(num_tokens=req.prompt_len, block_size=block_size,
                      num_prefix_blocks=len(hashes),
                      cached_blocks={i: held[i] for i in loads},
                      held_blocks={i: n for i, n in held.items() if n},
                      kv_block_bytes=max((i.kv_block_bytes for i in live), default=0))

    def _demand_blocks(self, req: Dispatch, loads: dict[str, LoadFields]) -> int:
        block_size = min(self.table[i].block_size for i in loads)
        return demand_blocks(req.prompt_len, block_size)

    def _place(self, req: Dispatch, open_: dict[str, LoadFields], now: float) -> str:
        demand = self._demand(req, open_)
        policy = self.dispatch_policy
        choice = (policy.place(open_, demand=demand) if isinstance(policy, Ferry)
                  else Choice(policy.choose(open_, high_priority=req.priority == Priority.HIGH,
                                            demand=demand)))
        instance_id = choice.instance_id
        block_size = self.table[instance_id].block_size
        cached = demand.cached_blocks.get(instance_id, 0)  # claimed there, not allocated
        prefill = demand.uncached_tokens(instance_id)
        if choice.pull_src is not None:
            # Its memory is the same (copied blocks are allocated there); its prefill less.
            prefill = max(0, req.prompt_len - choice.num_pull_blocks * block_size)
            self.pulls[req.req_id] = PullPlan(
                choice.pull_src, tuple(req.prefix_hashes[: choice.num_pull_blocks]))
        self.table.record_dispatch(
            instance_id,
            UnseenDispatch(
                req_id=req.req_id,
                demand_blocks=demand_blocks(req.prompt_len, block_size) - cached,
                high_priority=req.priority == Priority.HIGH,
                prefill_tokens=prefill,
            ),
        )
        if cached:
            self.counters.num_cached_blocks_placed += cached
        self.reqs[req.req_id] = HeldReq(instance_id, req.priority, req.reply_addr, now)
        self.counters.num_dispatched += 1
        return instance_id

    def pull_for(self, req: Dispatch) -> PullPrefix | None:
        """What to send the instance a request was just placed on, instead of its Dispatch
        frames, when the policy chose to pull its prefix there first (else None)."""
        plan = self.pulls.pop(req.req_id, None)
        src = self.table.get(plan.src_instance_id) if plan is not None else None
        if plan is None or src is None or not src.alive:
            return None
        self.counters.num_pulls += 1
        log.debug("prefix_pull", req_id=req.req_id, src=plan.src_instance_id,
                  num_blocks=len(plan.block_hashes))
        return PullPrefix.carrying(req, pull_id=f"{self.epoch}-p{next(self._pull_numbers)}",
                                   src_instance_id=src.instance_id,
                                   src_inbox_addr=src.inbox_addr,
                                   block_hashes=plan.block_hashes)

    def pull_done(self, msg: PullDone) -> Out:
        """A pull ended (the request is queued at its destination either way): count it."""
        self.counters.count_pull(msg)
        if not msg.ok:
            log.info("prefix_pull_failed", req_id=msg.req_id, src=msg.src_instance_id,
                     dst=msg.dst_instance_id, reason=msg.reason)
        return []

    def undo_dispatch(self, req: Dispatch, instance_id: str, message: str) -> DispatchRejected:
        """The forward to instance_id could not be queued: forget it, answer 429."""
        self.pulls.pop(req.req_id, None)
        self.table.cancel_last_dispatch(instance_id)
        self.reqs.pop(req.req_id, None)
        self.counters.num_dispatched -= 1
        return self._reject(req, 429, message)

    def _reject(self, req: Dispatch, code: int, message: str) -> DispatchRejected:
        self.counters.num_rejected += 1
        log.info("dispatch_rejected", req_id=req.req_id, code=code, reason=message)
        return DispatchRejected(req_id=req.req_id, code=code, message=message)

    def release(self, msg: Release) -> Out:
        """The gateway is done with a request; unless it finished, its holder aborts it
        (a pending one is just forgotten)."""
        if self.pending is not None and self.pending.remove(msg.req_id) is not None:
            return []
        held = self.reqs.pop(msg.req_id, None)
        self.recently_released[msg.req_id] = None
        while len(self.recently_released) > MAX_RECENTLY_RELEASED:
            del self.recently_released[next(iter(self.recently_released))]
        if held is None or msg.reason == "finished":
            return []
        inst = self.table.get(held.instance_id)
        if inst is None or not inst.alive:
            return []
        return [(inst.inbox_addr, Abort(req_id=msg.req_id, reason=msg.reason))]

    # ---- worker -> scheduler ------------------------------------------------------------

    def register(self, msg: Register, now: float) -> Out:
        """A worker (re)joins. Three cases:
        - unknown instance (new, or met after a scheduler restart): adopt the req_ids it holds;
        - it was declared dead: gateways replayed its requests elsewhere, so it aborts them;
        - it is alive here and registers holding nothing: it restarted and lost what it held,
          which gateways must replay (InstanceDown)."""
        prev = self.table.get(msg.instance_id)
        out: Out = []
        was_dead = (prev is not None and not prev.alive) or msg.instance_id in self.tombstones
        if prev is not None and prev.alive and not msg.req_ids and self._held_by(msg.instance_id):
            out += self._instance_down(msg.instance_id, now, reason="restarted")
        self.table.register(msg, now)
        self.dead_since.pop(msg.instance_id, None)
        self.tombstones.pop(msg.instance_id, None)
        self.prefix_index.drop(msg.instance_id)
        if msg.prefix_seed:  # what it caches already (a scheduler restart): a snapshot
            out += self._ask_snapshot(msg.instance_id, msg.inbox_addr, now)
        self.reregister_sent_s.pop(msg.instance_id, None)
        log.info(
            "instance_registered",
            instance_id=msg.instance_id,
            inbox_addr=msg.inbox_addr,
            num_blocks=msg.num_blocks,
            num_reqs=len(msg.req_ids),
            was_dead=was_dead,
        )
        priorities = dict(zip(msg.req_ids, msg.req_priorities, strict=False))
        for req_id in msg.req_ids:
            if was_dead:
                out.append(
                    (msg.inbox_addr, Abort(req_id=req_id, reason="instance was declared down"))
                )
                continue
            held = self.reqs.get(req_id)
            self.reqs[req_id] = HeldReq(
                msg.instance_id,
                held.priority if held else priorities.get(req_id, Priority.NORMAL),
                held.gateway_addr if held else None,
                now,
            )
        return out

    def load_report(self, msg: LoadReport, now: float) -> Out:
        """Apply a report; an instance we do not know (or declared dead) is asked to
        register again, at most every heartbeat_timeout_s / 2."""
        inst = self.table.get(msg.instance_id)
        prev_seq = inst.report_seq if inst is not None and inst.alive else None
        if self.table.apply_report(msg, now):
            out = [] if msg.req_ids is None else self._reconcile(msg, now)
            if prev_seq is not None and msg.seq > prev_seq:  # fresh: its cache events count
                out += self._cache_events(msg, prev_seq, now)
            return out
        last = self.reregister_sent_s.get(msg.instance_id)
        if last is not None and now - last < self.cfg.heartbeat_timeout_s / 2:
            return []
        self.reregister_sent_s[msg.instance_id] = now
        log.info("reregister_requested", instance_id=msg.instance_id)
        return [(msg.inbox_addr, ReRegister(scheduler_epoch=self.epoch))]

    def _cache_events(self, msg: LoadReport, prev_seq: int, now: float) -> Out:
        """Keep the prefix index: a snapshot replaces the instance's entries, events
        update them; a report missing in between (its events lost) asks for a snapshot."""
        if msg.cache_snapshot is not None:
            self.prefix_index.replace(msg.instance_id, msg.cache_snapshot)
            self.snapshot_asked_s.pop(msg.instance_id, None)
            return []
        self.prefix_index.apply(msg.instance_id, msg.cache_stored, msg.cache_evicted)
        if prev_seq >= 0 and msg.seq != prev_seq + 1 and self.table[msg.instance_id].prefix_seed:
            return self._ask_snapshot(msg.instance_id, msg.inbox_addr, now)
        return []

    def _ask_snapshot(self, instance_id: str, inbox_addr: str, now: float) -> Out:
        """CacheSnapshotRequest, at most every heartbeat_timeout_s per instance."""
        last = self.snapshot_asked_s.get(instance_id)
        if last is not None and now - last < self.cfg.heartbeat_timeout_s:
            return []
        self.snapshot_asked_s[instance_id] = now
        return [(inbox_addr, CacheSnapshotRequest())]

    def _reconcile(self, msg: LoadReport, now: float) -> Out:
        """Match the placement table with the requests the instance says it holds:
        - held here per the table, left out of two lists in a row, and placed more than
          PHANTOM_MIN_AGE_S ago (so not a Dispatch still on its way): a phantom, dropped;
        - listed but unknown here: adopted (a scheduler restart, a lost Placement), or,
          if its gateway released it, aborted again (the first Abort was lost)."""
        listed = set(msg.req_ids or ())
        for req_id in self._held_by(msg.instance_id):
            held = self.reqs[req_id]
            if req_id in listed:
                held.missing = False
            elif held.missing and now - held.since_s > PHANTOM_MIN_AGE_S:
                del self.reqs[req_id]
                log.info("phantom_request_dropped", req_id=req_id, instance_id=msg.instance_id)
            else:
                held.missing = True
        out: Out = []
        for req_id in listed:
            if req_id in self.reqs:
                continue  # here, or elsewhere while it migrates (MigrationDone decides)
            if req_id in self.recently_released:
                out.append((msg.inbox_addr, Abort(req_id=req_id, reason="released")))
            else:
                self.reqs[req_id] = HeldReq(msg.instance_id, Priority.NORMAL, None, now)
        return out

    def migration_done(self, msg: MigrationDone) -> Out:
        """Count the outcome; on commit the request's holder is now dst, its gateway learns."""
        mig = self.migrations.pop(msg.migration_id, None)
        if mig is not None:
            self.table.end_migration(mig.src_instance_id, mig.dst_instance_id)
        bound = log.bind(req_id=msg.req_id, migration_id=msg.migration_id)
        if not msg.committed:
            self.counters.count_abort(msg.reason)
            bound.info("migration_aborted", reason=msg.reason, src=msg.src_instance_id)
            return []
        self.counters.num_committed += 1
        bound.info(
            "migration_committed",
            src=msg.src_instance_id,
            dst=msg.dst_instance_id,
            downtime_s=msg.downtime_s,
            total_s=msg.total_s,
            num_blocks=msg.num_blocks,
        )
        dst = self.table.get(msg.dst_instance_id)
        held = self.reqs.get(msg.req_id)
        if held is None and msg.req_id in self.recently_released:
            # Released while it moved: the Abort went to the source, too late. Stop it on dst.
            if dst is not None and dst.alive:
                return [(dst.inbox_addr, Abort(req_id=msg.req_id, reason="released"))]
            return []
        if held is None:  # not known here (a scheduler restart in between): adopt it
            held = self.reqs[msg.req_id] = HeldReq(msg.dst_instance_id, Priority.NORMAL, None)
        held.instance_id = msg.dst_instance_id
        return self._to_gateway(held, Placement(req_id=msg.req_id, instance_id=msg.dst_instance_id))

    # ---- periodic -----------------------------------------------------------------------

    def expire(self, now: float) -> Out:
        """Heartbeats of instances and gateways, migrations that never reported, and old
        dead instances."""
        out: Out = []
        for instance_id in self.table.silent_since(now - self.cfg.heartbeat_timeout_s):
            out += self._instance_down(instance_id, now, reason="heartbeat timeout")
        for addr, seen in list(self.gateways.items()):
            if now - seen.last_seen_s > self.cfg.gateway_timeout_s:
                del self.gateways[addr]
                if seen.req_id_prefix:
                    out += self._gateway_gone(addr, seen.req_id_prefix, reason="silent")
        for mig in list(self.migrations.values()):
            if now - mig.started_s > MIGRATION_LOST_AFTER_S:
                del self.migrations[mig.migration_id]
                self.table.end_migration(mig.src_instance_id, mig.dst_instance_id)
                self.counters.count_abort("no MigrationDone")
        for instance_id, since in list(self.dead_since.items()):
            if now - since > DEAD_SHOWN_S:
                del self.dead_since[instance_id]
                self.table.remove(instance_id)
                self.tombstones[instance_id] = since
        for instance_id, since in list(self.tombstones.items()):
            if now - since > TOMBSTONE_S or len(self.tombstones) > MAX_TOMBSTONES:
                del self.tombstones[instance_id]
        for instance_id, sent_s in list(self.reregister_sent_s.items()):
            if now - sent_s > self.cfg.heartbeat_timeout_s:
                del self.reregister_sent_s[instance_id]
        return out

    def instance_view(self) -> InstanceView:
        """The instances taking new work, for gateways' bypass mode."""
        serving = sorted(self.table.loads(serving_only=True))
        first = self.table[serving[0]] if serving else None
        return InstanceView(
            scheduler_epoch=self.epoch,
            instances=tuple(
                InstanceAddr(instance_id=i, inbox_addr=self.table[i].inbox_addr)
                for i in serving
            ),
            # how gateways hash prompts: as the instances do (one model per cluster)
            block_size=first.block_size if first else 16,
            prefix_seed=first.prefix_seed if first else 0,
        )

    def broadcast_view(self, now: float) -> Out:
        """The view for every gateway; none in the start-up grace (see `in_grace`)."""
        if self.in_grace(now):
            return []
        view = self.instance_view()
        return [(addr, view) for addr in self.gateways]

    def rebalance(self, now: float) -> Out:
        """Run the migration policy; each decision goes through `migrate`'s checks."""
        out: Out = []
        if self.migration_policy is None:
            return out
        for decision in self.migration_policy(self.table.loads()):
            try:
                out += self.migrate(decision, now, keep_growth=True)[1]
            except SchedulerError as err:
                log.debug("migration_skipped", reason=err.message)
        return out

    # ---- commands -----------------------------------------------------------------------

    def migrate(
        self, decision: MigrationDecision, now: float, *, keep_growth: bool = False
    ) -> tuple[str, Out]:
        """Issue one migration: returns its id and the MigrateOut for the source. The
        source picks a request that fits the destination's free blocks, or with
        keep_growth (periodic rebalancing) its `migration_room`; an operator's
        `ferry migrate` may fill the destination."""
        src = self._live(decision.src_instance_id)
        dst = self._live(decision.dst_instance_id)
        if src is dst:
            raise SchedulerError(409, f"source and destination are both {src.instance_id}")
        if dst.draining or self.table.load(dst.instance_id).draining:
            raise SchedulerError(409, f"instance {dst.instance_id} is draining")
        migration_id = f"{self.epoch}-{next(self._migration_numbers)}"
        self.migrations[migration_id] = InFlightMigration(
            migration_id, src.instance_id, dst.instance_id, decision.req_id, now
        )
        self.table.start_migration(src.instance_id, dst.instance_id)
        self.counters.num_migrations_started += 1
        log.debug(
            "migration_issued",
            migration_id=migration_id,
            src=src.instance_id,
            dst=dst.instance_id,
            req_id=decision.req_id,
        )
        msg = MigrateOut(
            migration_id=migration_id,
            dst_instance_id=dst.instance_id,
            dst_inbox_addr=dst.inbox_addr,
            req_id=decision.req_id,
            dst_free_blocks=self._room_for_migration(dst.instance_id, keep_growth),
        )
        return migration_id, [(src.inbox_addr, msg)]

    def _room_for_migration(self, instance_id: str, keep_growth: bool) -> int:
        load = self.table.load(instance_id)
        if not keep_growth:
            return load.num_free_blocks
        return migration_room(load, growth_blocks=self.cfg.migrate_dst_growth_blocks,
                              headroom_blocks=self.cfg.high_priority_headroom_blocks)

    def migrate_request(self, req_id: str, dst_instance_id: str, now: float) -> tuple[str, Out]:
        """`ferry migrate REQ_ID --to INSTANCE_ID`."""
        held = self.reqs.get(req_id)
        if held is None:
            raise SchedulerError(404, f"unknown request {req_id!r}")
        if held.instance_id == dst_instance_id:
            raise SchedulerError(409, f"request {req_id!r} already runs on {dst_instance_id}")
        decision = MigrationDecision(held.instance_id, dst_instance_id, req_id)
        return self.migrate(decision, now)

    def drain(self, instance_id: str) -> Out:
        """No new requests for the instance (the autoscaler's scale-down: its requests
        finish there, or move as the migration policy decides)."""
        inst = self._live(instance_id)
        self.table.set_draining(instance_id)
        log.info("instance_draining", instance_id=instance_id)
        return [(inst.inbox_addr, SetDraining(draining=True))]

    def evacuate(self, instance_id: str) -> Out:
        """Drain the instance and migrate everything it holds away (`evacuation`)."""
        out = [] if instance_id in self.evacuating else self.drain(instance_id)
        self.evacuating.add(instance_id)
        return out

    def cancel_drain(self, instance_id: str) -> Out:
        inst = self._live(instance_id)
        self.evacuating.discard(instance_id)
        self.table.set_draining(instance_id, False)
        log.info("instance_serving_again", instance_id=instance_id)
        return [(inst.inbox_addr, SetDraining(draining=False))]

    def leaving(self, msg: Leaving, now: float) -> Out:
        """A worker stops: evacuate it, or, once it exits (done), forget it."""
        inst = self.table.get(msg.instance_id)
        if inst is None or not inst.alive:
            return []
        if msg.done:
            self.evacuating.discard(msg.instance_id)
            return self.terminate(msg.instance_id, now)
        return self.evacuate(msg.instance_id)

    def num_held(self, instance_id: str) -> int:
        """Requests the instance holds: per the placement table and its last report."""
        load = self.table.load(instance_id)
        return max(len(self._held_by(instance_id)), load.num_running + load.num_waiting)

    def is_drained(self, instance_id: str) -> bool:
        """Draining, holding nothing, and no migration out of it still running."""
        inst = self.table.get(instance_id)
        return (inst is not None and inst.alive and inst.draining
                and self.num_held(instance_id) == 0
                and not any(m.src_instance_id == instance_id for m in self.migrations.values()))

    def evacuation(self, now: float) -> Out:
        """For each evacuating instance, migrations out (up to max_migrations_per_instance
        at once), each to the live non-draining instance with the most room for it after
        the others' growth; the source worker picks the request (queued ones first)."""
        out: Out = []
        serving = self.table.loads(serving_only=True)
        for instance_id in sorted(self.evacuating):
            inst = self.table.get(instance_id)
            if inst is None or not inst.alive:
                self.evacuating.discard(instance_id)
                continue
            moving = [m for m in self.migrations.values() if m.src_instance_id == instance_id]
            busy = len(moving)
            if self.num_held(instance_id) <= busy:
                continue
            # One migration per pair at a time: a pair's KV goes over one ordered channel.
            paired = {m.dst_instance_id for m in moving}
            rooms = sorted(((self._room_for_migration(i, keep_growth=True), i)
                            for i in serving if i not in paired), reverse=True)
            for room, dst in rooms[: self.cfg.max_migrations_per_instance - busy]:
                if room <= 0:
                    break
                try:
                    out += self.migrate(MigrationDecision(instance_id, dst), now,
                                        keep_growth=True)[1]
                except SchedulerError as err:
                    log.debug("evacuation_skipped", reason=err.message)
        return out

    def terminate(self, instance_id: str, now: float) -> Out:
        """The instance is being stopped: forget it (gateways replay anything it still held)."""
        self.evacuating.discard(instance_id)
        out: Out = []
        inst = self.table.get(instance_id)
        if inst is not None and inst.alive and self._held_by(instance_id):
            out = self._instance_down(instance_id, now, reason="terminated")
        elif inst is not None and inst.alive:
            self._depart(instance_id)
        self.table.remove(instance_id)
        self.prefix_index.drop(instance_id)
        self.dead_since.pop(instance_id, None)
        return out

    def status(self, now: float) -> StatusReply:
        headroom = self.cfg.high_priority_headroom_blocks
        instances = []
        for inst in sorted(self.table, key=lambda i: i.instance_id):
            load = (
                self.table.load(inst.instance_id)
                if inst.alive
                else (inst.report or empty_load(inst.num_blocks))
            )
            instances.append(
                InstanceStatus(
                    instance_id=inst.instance_id,
                    inbox_addr=inst.inbox_addr,
                    alive=inst.alive,
                    load=load,
                    freeness=to_wire(freeness(load, headroom_blocks=headroom)),
                    last_report_age_s=max(0.0, now - inst.last_heard_s),
                )
            )
        return StatusReply(
            scheduler_epoch=self.epoch,
            dispatch_policy=self.dispatch_policy.name,
            instances=tuple(instances),
            requests=tuple(
                RequestPlacement(req_id=r, instance_id=h.instance_id, priority=h.priority)
                for r, h in sorted(self.reqs.items())
            ),
            num_migrations_committed=self.counters.num_committed,
            num_migrations_aborted=self.counters.num_aborted,
            abort_reasons=dict(self.counters.abort_reasons),
            num_pending=len(self.pending) if self.pending is not None else 0,
            num_pulls=self.counters.num_pulls,
            num_pulls_ok=self.counters.num_pulls_ok,
            num_pulls_failed=self.counters.num_pulls_failed,
            num_pull_blocks=self.counters.num_pull_blocks,
            pull_fail_reasons=dict(self.counters.pull_fail_reasons),
        )

    # ---- helpers --------------------------------------------------------------------------

    def _live(self, instance_id: str) -> Instance:
        inst = self.table.get(instance_id)
        if inst is None or not inst.alive:
            raise SchedulerError(404, f"unknown or dead instance {instance_id!r}")
        return inst

    def _held_by(self, instance_id: str) -> list[str]:
        return [r for r, h in self.reqs.items() if h.instance_id == instance_id]

    def _to_gateway(self, held: HeldReq, msg: Any) -> Out:
        if held.gateway_addr is not None:
            return [(held.gateway_addr, msg)]
        return [(addr, msg) for addr in self.gateways]

    def take_departed(self) -> list[str]:
        """The inbox addresses of the instances declared dead or stopped since the last
        call, none still used by a live instance: the process closes its sockets to them
        (what is still queued there is moot; a later send, to an instance that came back,
        opens a new one). Take them before sending what the same call returned."""
        addrs = list(self.departed)
        self.departed.clear()
        return addrs

    def _depart(self, instance_id: str) -> None:
        addr = self.table[instance_id].inbox_addr
        if not any(i.alive and i.inbox_addr == addr and i.instance_id != instance_id
                   for i in self.table):
            self.departed.append(addr)

    def _instance_down(self, instance_id: str, now: float, *, reason: str) -> Out:
        """Tell gateways (they replay its requests), then drop its requests and migrations."""
        self._depart(instance_id)
        self.table.mark_dead(instance_id)
        self.prefix_index.drop(instance_id)
        self.dead_since[instance_id] = now
        out: Out = [(addr, InstanceDown(instance_id=instance_id)) for addr in self.gateways]
        dropped = self._held_by(instance_id)
        for req_id in dropped:
            del self.reqs[req_id]
        for mig in list(self.migrations.values()):
            if instance_id in (mig.src_instance_id, mig.dst_instance_id):
                del self.migrations[mig.migration_id]
                self.table.end_migration(mig.src_instance_id, mig.dst_instance_id)
                if mig.src_instance_id == instance_id:  # no one is left to send MigrationDone
                    self.counters.count_abort("source instance down")
        log.warning("instance_down", instance_id=instance_id, reason=reason, num_reqs=len(dropped))
        self.counters.instances_down[reason] = self.counters.instances_down.get(reason, 0) + 1
        return out
