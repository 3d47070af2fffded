"""The scheduler's state and decisions, without sockets or an event loop (STYLE 5).

Entry points take a decoded message (or nothing) and `now`, monotonic seconds, and return
what to send as `(address, message)` pairs; `services/scheduler/main.py` sends them. The
state: the instance table (loads), the placement table (req_id -> holder), the
migrations in flight, the gateways seen, and counters for `ferry status`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ferry.common.config import SchedulerConfig
from ferry.common.logging import get_logger
from ferry.common.wire import (
    Abort,
    Dispatch,
    DispatchRejected,
    InstanceAddr,
    InstanceDown,
    InstanceStatus,
    InstanceView,
    LoadFields,
    LoadReport,
    MigrateOut,
    MigrationDone,
    Placement,
    Priority,
    Register,
    Release,
    RequestPlacement,
    ReRegister,
    SetDraining,
    StatusReply,
)
from ferry.services.scheduler.dispatch import LeastLoad, make_dispatch_policy
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
from ferry.services.scheduler.table import Instance, InstanceTable, UnseenDispatch

Out = list[tuple[str, Any]]  # (peer inbox address, wire message)

# Requests an instance may have queued (estimated) before dispatch skips it; when every
# instance is past it the gateway gets 429. Matches EngineConfig.max_waiting.
DEFAULT_MAX_QUEUED_PER_INSTANCE = 4096
MAX_GATEWAYS = 256  # gateway addresses remembered (least recently seen forgotten first)
MAX_ABORT_REASONS = 64  # distinct abort reasons counted; the rest count as "other"
MAX_RECENTLY_RELEASED = 16_384  # released req_ids remembered (see migration_done)
MIGRATION_LOST_AFTER_S = 120.0  # no MigrationDone this long after MigrateOut: count it lost
DEAD_FORGET_AFTER_S = 600.0  # a dead instance stays in `ferry status` this long

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


@dataclass(slots=True)
class Counters:
    num_dispatched: int = 0
    num_rejected: int = 0  # DispatchRejected sent
    num_committed: int = 0  # migrations
    num_aborted: int = 0
    abort_reasons: dict[str, int] = field(default_factory=dict)

    def count_abort(self, reason: str) -> None:
        self.num_aborted += 1
        key = reason[:80] or "unknown"
        if key not in self.abort_reasons and len(self.abort_reasons) >= MAX_ABORT_REASONS:
            key = "other"
        self.abort_reasons[key] = self.abort_reasons.get(key, 0) + 1


class SchedulerCore:
    def __init__(
        self,
        cfg: SchedulerConfig,
        *,
        epoch: str,
        max_queued_per_instance: int = DEFAULT_MAX_QUEUED_PER_INSTANCE,
        migrate_margin: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.epoch = epoch  # changes on every scheduler start
        self.max_queued_per_instance = max_queued_per_instance
        self.table = InstanceTable()
        self.dispatch_policy = make_dispatch_policy(
            cfg.dispatch_policy, headroom_blocks=cfg.high_priority_headroom_blocks
        )
        self.reqs: dict[str, HeldReq] = {}  # req_id -> holder, for every request in flight
        self.migrations: dict[str, InFlightMigration] = {}  # migration_id -> migration
        self.gateways: dict[str, None] = {}  # gateway inbox addresses, least recently seen first
        self.recently_released: dict[str, None] = {}
        self.dead_since: dict[str, float] = {}  # instance_id -> when it was declared dead
        self.reregister_sent_s: dict[str, float] = {}  # instance_id -> last ReRegister sent
        self.counters = Counters()
        self._migration_numbers = itertools.count()
        self.pending = (
            PendingQueue(capacity=cfg.max_pending, window=cfg.pending_window,
                         max_wait_s=cfg.pending_max_wait_s)
            if cfg.hold_until_room else None
        )
        # Periodic migration policies (DESIGN §5); least_load is the no-migration baseline.
        # A custom policy appends itself here; `ferry migrate` goes through `migrate` too.
        self.migration_hooks: list[MigrationHook] = []
        if cfg.enable_migration and cfg.dispatch_policy != LeastLoad.name:
            margin = (
                migrate_margin
                if migrate_margin is not None
                else max(1.0, cfg.migrate_out_threshold)
            )
            self.migration_hooks.append(
                partial(
                    pair_migrations,
                    threshold=cfg.migrate_out_threshold,
                    margin=margin,
                    max_per_instance=cfg.max_migrations_per_instance,
                    headroom_blocks=cfg.high_priority_headroom_blocks,
                )
            )

    # ---- gateway -> scheduler -----------------------------------------------------------

    def see_gateway(self, addr: str) -> Out:
        """Remember a gateway inbox; a new one gets the instance view at once."""
        is_new = addr not in self.gateways
        self.gateways.pop(addr, None)
        self.gateways[addr] = None
        while len(self.gateways) > MAX_GATEWAYS:
            del self.gateways[next(iter(self.gateways))]
        return [(addr, self.instance_view())] if is_new else []

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
        if isinstance(open_, tuple):
            return self._reject(req, *open_)
        if self.pending is not None:
            need = self._demand_blocks(req, open_)
            roomy = self._with_room(open_, need)
            if not roomy:
                if self.pending.is_full:
                    return self._reject(req, 429, "overloaded: the pending queue is full")
                self.pending.add(PendingEntry(req.req_id, need, now, (req, payload),
                                              priority=req.priority))
                return Pending(req.req_id)
            open_ = roomy
        return self._place(req, open_)

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
            roomy = self._with_room(open_, entry.demand_blocks) or open_
            placed.append(Released(self._place(req, roomy), req, payload))
        return placed, out

    def _open_instances(self) -> dict[str, LoadFields] | tuple[int, str]:
        """The loads of the instances that may take a request, or (code, reason) if none."""
        serving = self.table.loads(serving_only=True)
        if not serving:
            return 503, "no live instance"
        open_ = {
            i: load
            for i, load in serving.items()
            if load.num_waiting < self.max_queued_per_instance
        }
        if not open_:
            return 429, "overloaded: every instance's queue is full"
        return open_

    def _best_room(self, loads: dict[str, LoadFields]) -> int:
        headroom = self.cfg.high_priority_headroom_blocks
        return max(dispatch_room(load, headroom_blocks=headroom) for load in loads.values())

    def _with_room(self, loads: dict[str, LoadFields], need: int) -> dict[str, LoadFields]:
        """The instances that could start a request of `need` blocks now: the policy
        chooses among these, so a request placed for room lands where the room is."""
        headroom = self.cfg.high_priority_headroom_blocks
        return {i: load for i, load in loads.items()
                if dispatch_room(load, headroom_blocks=headroom) >= need}

    def _demand_blocks(self, req: Dispatch, loads: dict[str, LoadFields]) -> int:
        block_size = min(self.table[i].block_size for i in loads)
        return demand_blocks(req.prompt_len, block_size)

    def _place(self, req: Dispatch, open_: dict[str, LoadFields]) -> str:
        instance_id = self.dispatch_policy.choose(
            open_, high_priority=req.priority == Priority.HIGH
        )
        block_size = self.table[instance_id].block_size
        self.table.record_dispatch(
            instance_id,
            UnseenDispatch(
                req_id=req.req_id,
                demand_blocks=demand_blocks(req.prompt_len, block_size),
                high_priority=req.priority == Priority.HIGH,
            ),
        )
        self.reqs[req.req_id] = HeldReq(instance_id, req.priority, req.reply_addr)
        self.counters.num_dispatched += 1
        return instance_id

    def undo_dispatch(self, req: Dispatch, instance_id: str, message: str) -> DispatchRejected:
        """The forward to instance_id could not be queued: forget it, answer 429."""
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
        was_dead = prev is not None and not prev.alive
        if prev is not None and prev.alive and not msg.req_ids and self._held_by(msg.instance_id):
            out += self._instance_down(msg.instance_id, now, reason="restarted")
        self.table.register(msg, now)
        self.dead_since.pop(msg.instance_id, None)
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
            )
        return out

    def load_report(self, msg: LoadReport, now: float) -> Out:
        """Apply a report; an instance we do not know (or declared dead) is asked to
        register again, at most every heartbeat_timeout_s / 2."""
        if self.table.apply_report(msg, now):
            return []
        last = self.reregister_sent_s.get(msg.instance_id)
        if last is not None and now - last < self.cfg.heartbeat_timeout_s / 2:
            return []
        self.reregister_sent_s[msg.instance_id] = now
        log.info("reregister_requested", instance_id=msg.instance_id)
        return [(msg.inbox_addr, ReRegister(scheduler_epoch=self.epoch))]

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
        """Heartbeats, migrations that never reported, and old dead instances."""
        out: Out = []
        for instance_id in self.table.silent_since(now - self.cfg.heartbeat_timeout_s):
            out += self._instance_down(instance_id, now, reason="heartbeat timeout")
        for mig in list(self.migrations.values()):
            if now - mig.started_s > MIGRATION_LOST_AFTER_S:
                del self.migrations[mig.migration_id]
                self.table.end_migration(mig.src_instance_id, mig.dst_instance_id)
                self.counters.count_abort("no MigrationDone")
        for instance_id, since in list(self.dead_since.items()):
            if now - since > DEAD_FORGET_AFTER_S:
                del self.dead_since[instance_id]
                self.table.remove(instance_id)
        for instance_id, sent_s in list(self.reregister_sent_s.items()):
            if now - sent_s > self.cfg.heartbeat_timeout_s:
                del self.reregister_sent_s[instance_id]
        return out

    def instance_view(self) -> InstanceView:
        """The instances taking new work, for gateways' bypass mode."""
        serving = self.table.loads(serving_only=True)
        return InstanceView(
            scheduler_epoch=self.epoch,
            instances=tuple(
                InstanceAddr(instance_id=i, inbox_addr=self.table[i].inbox_addr)
                for i in sorted(serving)
            ),
        )

    def broadcast_view(self) -> Out:
        view = self.instance_view()
        return [(addr, view) for addr in self.gateways]

    def rebalance(self, now: float) -> Out:
        """Run the migration hooks; each decision goes through `migrate`'s checks."""
        out: Out = []
        for hook in self.migration_hooks:
            for decision in hook(self.table.loads()):
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
        inst = self._live(instance_id)
        self.table.set_draining(instance_id)
        log.info("instance_draining", instance_id=instance_id)
        return [(inst.inbox_addr, SetDraining(draining=True))]

    def terminate(self, instance_id: str, now: float) -> Out:
        """The instance is being stopped: forget it (gateways replay anything it still held)."""
        out: Out = []
        inst = self.table.get(instance_id)
        if inst is not None and inst.alive and self._held_by(instance_id):
            out = self._instance_down(instance_id, now, reason="terminated")
        self.table.remove(instance_id)
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

    def _instance_down(self, instance_id: str, now: float, *, reason: str) -> Out:
        """Tell gateways (they replay its requests), then drop its requests and migrations."""
        self.table.mark_dead(instance_id)
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
        return out
