"""The scheduler process (DESIGN §1, §5, §7): one asyncio loop (on uvloop, see entry.py) around
SchedulerCore, which makes every decision; this file only moves messages and keeps time.

    recv_from_peers  PULL   cfg.inbox  Dispatch, Release (gateways); Register, LoadReport,
                                       MigrationDone, PullDone (workers)
    recv_from_admin  ROUTER cfg.admin  StatusRequest, MigrateCommand (ferry CLI); replies
                                       go back on it (send_to_admin)
    send_to_peers    PUSH per inbox    worker inboxes: Dispatch (forwarded unread) or PullPrefix, Abort,
                                       MigrateOut, SetDraining, ReRegister; gateway inboxes:
                                       Placement, DispatchRejected, InstanceView, InstanceDown
Periodic: heartbeat check, InstanceView, migration pairing, autoscaling (when enabled),
the pending queue (hold_until_room; also tried after every load report, which is what
changes an instance's room in the scheduler's view).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from ferry.common import wire
from ferry.common.codec import WireError
from ferry.common.config import SchedulerConfig
from ferry.common.logging import get_logger
from ferry.common.security import KEYLESS, ClusterKeys, describe, for_process, refusal
from ferry.common.wire import (
    AdminError,
    Dispatch,
    DispatchRejected,
    DrainCommand,
    DrainReply,
    GatewayHello,
    Leaving,
    LoadReport,
    MigrateCommand,
    MigrateCommandReply,
    MigrationDone,
    Placement,
    PullDone,
    Register,
    Release,
    StatusRequest,
)
from ferry.common.zmq_util import (
    DEFAULT_HWM,
    Inbox,
    Outboxes,
    Overloaded,
    frames_and_sender,
    hard_frame_cap,
    make_context,
)
from ferry.services.scheduler.autoscale import ACTION_NAMES, autoscale_round, make_autoscaler
from ferry.services.scheduler.core import (
    Out,
    Pending,
    Released,
    SchedulerCore,
    SchedulerError,
)
from ferry.services.scheduler.metrics import SchedulerStats
from ferry.services.scheduler.provisioner import LocalProcessProvisioner

# Who may send what (checked per message when the cluster has keys; common/security.py).
GATEWAY, WORKER, ADMIN = frozenset({"gateway"}), frozenset({"worker"}), frozenset({"admin"})
INBOX_SENDERS = {Dispatch: GATEWAY, Release: GATEWAY, GatewayHello: GATEWAY,
                 Register: WORKER, LoadReport: WORKER, MigrationDone: WORKER, Leaving: WORKER,
                 PullDone: WORKER}
ADMIN_SENDERS = {StatusRequest: ADMIN, MigrateCommand: ADMIN, DrainCommand: ADMIN}
ADMIN_TYPES = tuple(ADMIN_SENDERS)
MAX_ADMIN_WAITS = 64  # MigrateCommands waiting for their MigrationDone at once; more get 429
MAX_ADMIN_TIMEOUT_S = 600.0
AUTOSCALE_INTERVAL_S = 1.0
PENDING_INTERVAL_S = 0.05  # the pending queue's tick (its max wait; rooms change on reports)

log = get_logger()


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        *,
        ctx: zmq.asyncio.Context | None = None,
        provisioner: LocalProcessProvisioner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cfg.autoscale and provisioner is None:
            raise ValueError("autoscale needs a provisioner")
        ctx = ctx or make_context()
        self.keys = for_process(ctx, cfg.keys_dir, cfg.key_name, "scheduler")
        self.cfg = cfg
        self.clock = clock
        self.core = SchedulerCore(
            cfg,
            epoch=uuid.uuid4().hex[:12],
            started_s=clock(),
        )
        self.autoscaler = make_autoscaler(cfg) if cfg.autoscale else None
        self.stats = SchedulerStats()  # for /metrics (metrics.py): migrations, autoscaling
        self.provisioner = provisioner
        self.recv_from_peers = Inbox(ctx, cfg.inbox.bind, allowed=INBOX_SENDERS,
                                     max_frame_bytes=cfg.max_frame_bytes, keys=self.keys)
        self.recv_from_admin = bind_router(ctx, cfg.admin.bind, cfg.max_frame_bytes, self.keys)
        self.send_to_peers = Outboxes(ctx, keys=self.keys)
        self.handlers: dict[type, Callable[[Any, list[bytes]], None]] = {
            Dispatch: self.handle_dispatch,
            Release: self.handle_release,
            GatewayHello: self.handle_gateway_hello,
            Register: self.handle_register,
            LoadReport: self.handle_load_report,
            MigrationDone: self.handle_migration_done,
            Leaving: self.handle_leaving,
            PullDone: self.handle_pull_done,
        }
        self.admin_handlers: dict[type, Callable[[list[bytes], Any], None]] = {
            StatusRequest: self.handle_status,
            MigrateCommand: self.handle_migrate_command,
            DrainCommand: self.handle_drain_command,
        }
        self.admin_waits: dict[str, asyncio.Future[MigrationDone]] = {}  # migration_id -> outcome
        # `ferry drain` commands waiting for their instance to be empty: (route, id, deadline)
        self.drain_waits: list[tuple[list[bytes], str, float]] = []
        self.admin_tasks: set[asyncio.Task] = set()
        self.num_admin_rejected = 0  # malformed or unexpected admin messages
        self.num_handler_errors = 0  # exceptions raised by a handler (bugs; the loop goes on)
        self.num_send_dropped = 0  # messages dropped because a peer's queue was full

    @property
    def inbox_endpoint(self) -> str:
        return self.recv_from_peers.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def admin_endpoint(self) -> str:
        return self.recv_from_admin.getsockopt_string(zmq.LAST_ENDPOINT)

    async def run(self) -> None:
        log.info(
            "scheduler_started",
            epoch=self.core.epoch,
            inbox=self.inbox_endpoint,
            admin=self.admin_endpoint,
            policy=self.cfg.dispatch_policy,
            migration=self.core.migration_policy is not None,
            autoscale=self.cfg.autoscale,
            **describe(self.keys, self.cfg.inbox.bind),
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.serve_peers())
            tasks.create_task(self.serve_admin())
            tasks.create_task(self.every(self.cfg.heartbeat_timeout_s / 4, self.check_heartbeats))
            tasks.create_task(self.every(self.cfg.view_interval_s, self.broadcast_view))
            # migration policy (when it has hooks) and evacuations of draining instances
            tasks.create_task(self.every(self.cfg.migration_interval_s, self.rebalance))
            if self.autoscaler is not None:
                tasks.create_task(self.every(AUTOSCALE_INTERVAL_S, self.autoscale))
            if self.core.pending is not None:
                tasks.create_task(self.every(PENDING_INTERVAL_S, self.release_pending))

    async def serve_peers(self) -> None:
        while True:
            frames, msg = await self.recv_from_peers.recv_raw()
            self.guarded(self.handlers[type(msg)], msg, frames)

    async def serve_admin(self) -> None:
        while True:
            if self.keys is None:
                frames, sender = await self.recv_from_admin.recv_multipart(), KEYLESS
            else:
                frames, sender = frames_and_sender(
                    await self.recv_from_admin.recv_multipart(copy=False))
            route, body = frames[:1], frames[1:]
            if body and body[0] == b"":  # a REQ client: keep its delimiter
                route, body = frames[:2], frames[2:]
            try:
                msg = wire.decode(body, ADMIN_TYPES, self.cfg.max_frame_bytes)
            except WireError as err:
                self.num_admin_rejected += 1
                log.warning("rejected_admin_message", code=err.code, error=err.message)
                self.send_to_admin(route, AdminError(code=err.code, message=err.message))
                continue
            if self.keys is not None and (why := refusal(msg, sender, ADMIN_SENDERS)):
                self.num_admin_rejected += 1
                log.warning("admin_sender_refused", reason=why)
                self.send_to_admin(route, AdminError(code=403, message=why))
                continue
            if not self.guarded(self.admin_handlers[type(msg)], route, msg):
                self.send_to_admin(
                    route, AdminError(code=500, message="internal error, see the scheduler log")
                )

    async def every(self, interval_s: float, tick: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.guarded(tick)

    def guarded(self, handler: Callable[..., None], *args: Any) -> bool:
        """Run a handler; a bug in one message's handling is logged, not fatal. False if it
        raised."""
        try:
            handler(*args)
        except Exception:
            self.num_handler_errors += 1
            log.exception("handler_failed", handler=getattr(handler, "__name__", repr(handler)))
            return False
        return True

    # ---- peers ----------------------------------------------------------------------------

    def handle_dispatch(self, req: Dispatch, frames: list[bytes]) -> None:
        now = self.clock()
        self.send_all(self.core.see_gateway(req.reply_addr, now))
        placed = self.core.dispatch(req, now=now, payload=frames)
        if isinstance(placed, DispatchRejected):
            self.send(req.reply_addr, placed)
        elif not isinstance(placed, Pending):
            self.forward(Released(placed, req, frames))

    def forward(self, placed: Released) -> None:
        """Send a placed request's frames to its instance (or, when its prefix is to be
        pulled there first, a PullPrefix carrying it); its gateway learns where."""
        req = placed.req
        addr = self.core.table[placed.instance_id].inbox_addr
        pull = self.core.pull_for(req)
        try:
            if pull is not None:
                self.send_to_peers.send(addr, pull)
            else:
                self.send_to_peers.send_frames(addr, placed.payload)
        except Overloaded as err:
            self.send(req.reply_addr, self.core.undo_dispatch(req, placed.instance_id, str(err)))
            return
        self.send(req.reply_addr, Placement(req_id=req.req_id, instance_id=placed.instance_id))

    def release_pending(self) -> None:
        placed, out = self.core.release_pending(self.clock())
        for one in placed:
            self.forward(one)
        self.send_all(out)

    def handle_gateway_hello(self, msg: GatewayHello, frames: list[bytes]) -> None:
        self.send_all(self.core.see_gateway(msg.inbox_addr, self.clock(), msg.req_id_prefix))

    def handle_release(self, msg: Release, frames: list[bytes]) -> None:
        self.send_all(self.core.release(msg))

    def handle_register(self, msg: Register, frames: list[bytes]) -> None:
        self.send_all(self.core.register(msg, self.clock()))

    def handle_load_report(self, msg: LoadReport, frames: list[bytes]) -> None:
        self.send_all(self.core.load_report(msg, self.clock()))
        if self.core.pending:
            self.release_pending()

    def handle_leaving(self, msg: Leaving, frames: list[bytes]) -> None:
        self.send_all(self.core.leaving(msg, self.clock()))

    def handle_pull_done(self, msg: PullDone, frames: list[bytes]) -> None:
        self.send_all(self.core.pull_done(msg))

    def handle_migration_done(self, msg: MigrationDone, frames: list[bytes]) -> None:
        self.send_all(self.core.migration_done(msg))
        self.stats.migration_done(msg)
        waiter = self.admin_waits.pop(msg.migration_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    # ---- admin ----------------------------------------------------------------------------

    def handle_status(self, route: list[bytes], msg: StatusRequest) -> None:
        self.send_to_admin(route, self.core.status(self.clock()))

    def handle_migrate_command(self, route: list[bytes], msg: MigrateCommand) -> None:
        if not (msg.timeout_s > 0 and math.isfinite(msg.timeout_s)):
            self.send_to_admin(
                route, AdminError(code=400, message="timeout_s must be a positive number")
            )
            return
        if len(self.admin_waits) >= MAX_ADMIN_WAITS:
            self.send_to_admin(
                route, AdminError(code=429, message="too many migrate commands waiting")
            )
            return
        try:
            migration_id, out = self.core.migrate_request(
                msg.req_id, msg.dst_instance_id, self.clock()
            )
        except SchedulerError as err:
            self.send_to_admin(route, AdminError(code=err.code, message=err.message))
            return
        waiter = self.admin_waits[migration_id] = asyncio.get_running_loop().create_future()
        self.send_all(out)
        timeout_s = min(msg.timeout_s, MAX_ADMIN_TIMEOUT_S)
        task = asyncio.create_task(self.answer_migrate(route, migration_id, waiter, timeout_s))
        self.admin_tasks.add(task)
        task.add_done_callback(self.admin_tasks.discard)

    async def answer_migrate(
        self,
        route: list[bytes],
        migration_id: str,
        waiter: asyncio.Future[MigrationDone],
        timeout_s: float,
    ) -> None:
        try:
            done = await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            self.admin_waits.pop(migration_id, None)
            reason = f"no outcome within {timeout_s:.1f}s (migration {migration_id})"
            self.send_to_admin(route, MigrateCommandReply(ok=False, reason=reason, done=None))
            return
        self.send_to_admin(
            route, MigrateCommandReply(ok=done.committed, reason=done.reason, done=done)
        )

    def handle_drain_command(self, route: list[bytes], msg: DrainCommand) -> None:
        """Evacuate an instance and answer once it is empty (or at the timeout); with
        cancel, make it take requests again and answer at once."""
        if not (msg.timeout_s > 0 and math.isfinite(msg.timeout_s)):
            self.send_to_admin(route, AdminError(code=400,
                                                 message="timeout_s must be a positive number"))
            return
        if len(self.drain_waits) >= MAX_ADMIN_WAITS:
            self.send_to_admin(route, AdminError(code=429, message="too many drains waiting"))
            return
        try:
            out = (self.core.cancel_drain(msg.instance_id) if msg.cancel
                   else self.core.evacuate(msg.instance_id))
        except SchedulerError as err:
            self.send_to_admin(route, AdminError(code=err.code, message=err.message))
            return
        self.send_all(out)
        if msg.cancel:
            self.send_to_admin(route, DrainReply(ok=True, reason="", num_left=0))
            return
        timeout_s = min(msg.timeout_s, MAX_ADMIN_TIMEOUT_S)
        self.drain_waits.append((route, msg.instance_id, self.clock() + timeout_s))
        self.answer_drains()

    def answer_drains(self) -> None:
        """Answer the drain commands whose instance is now empty, dead, or out of time."""
        now, waiting = self.clock(), []
        for route, instance_id, deadline in self.drain_waits:
            inst = self.core.table.get(instance_id)
            if self.core.is_drained(instance_id):
                self.send_to_admin(route, DrainReply(ok=True, reason="", num_left=0))
            elif inst is None or not inst.alive:
                self.send_to_admin(route, DrainReply(
                    ok=False, reason=f"{instance_id} is gone (its requests were replayed)",
                    num_left=0))
            elif now >= deadline:
                self.send_to_admin(route, DrainReply(
                    ok=False, reason="timed out; it keeps draining",
                    num_left=self.core.num_held(instance_id)))
            else:
                waiting.append((route, instance_id, deadline))
        self.drain_waits = waiting

    def send_to_admin(self, route: list[bytes], msg: Any) -> None:
        try:
            self.recv_from_admin.send_multipart([*route, *wire.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.num_send_dropped += 1
            log.warning("admin_reply_dropped", type=type(msg).__name__,
                        num_send_dropped=self.num_send_dropped)

    # ---- periodic -------------------------------------------------------------------------

    def check_heartbeats(self) -> None:
        self.send_all(self.core.expire(self.clock()))

    def broadcast_view(self) -> None:
        self.send_all(self.core.broadcast_view(self.clock()))

    def rebalance(self) -> None:
        now = self.clock()
        self.send_all(self.core.rebalance(now))
        self.send_all(self.core.evacuation(now))
        if self.drain_waits:
            self.answer_drains()

    def autoscale(self) -> None:
        assert self.autoscaler is not None and self.provisioner is not None
        now = self.clock()
        for instance_id in self.provisioner.reap(now):
            self.autoscaler.forget(instance_id)
        out, actions = autoscale_round(self.autoscaler, self.core, self.provisioner, now,
                                       removable=set(self.provisioner.procs))
        self.send_all(out)
        for action in actions:
            self.stats.autoscaled(ACTION_NAMES[type(action)])

    # ---- sending --------------------------------------------------------------------------

    def send_all(self, out: Out) -> None:
        for addr in self.core.take_departed():  # first: out may reach a returning instance
            self.send_to_peers.drop(addr)
        for addr, msg in out:
            self.send(addr, msg)

    def send(self, addr: str, msg: Any) -> None:
        """Queue msg for addr. One that cannot be queued (a full queue, an address no
        socket reaches) is counted and logged; it never stops the sends after it."""
        try:
            self.send_to_peers.send(addr, msg)
        except Exception as err:  # Overloaded, BadAddress, or a bug: contained to this msg
            self.num_send_dropped += 1
            log.warning("send_dropped", addr=addr, type=type(msg).__name__, error=str(err),
                        num_send_dropped=self.num_send_dropped)

    def close(self) -> None:
        for task in self.admin_tasks:
            task.cancel()
        self.recv_from_peers.close()
        self.recv_from_admin.close(linger=0)
        self.send_to_peers.close()
        if self.provisioner is not None:
            self.provisioner.close()


def bind_router(ctx: zmq.asyncio.Context, bind: str, max_frame_bytes: int,
                keys: ClusterKeys | None) -> zmq.asyncio.Socket:
    """The admin ROUTER, bounded like every other socket (CURVE with cluster keys)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, DEFAULT_HWM)
    sock.setsockopt(zmq.SNDHWM, DEFAULT_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_cap(max_frame_bytes))
    if keys is not None:
        keys.server(sock)
    sock.bind(bind)
    return sock

