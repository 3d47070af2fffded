"""The worker process: one model instance (a "llumlet" in the paper).

Wraps the pure engine with ZMQ: one PULL inbox for the scheduler, gateways (bypass
mode) and peer workers (migration control); PUSH outboxes to the scheduler and to each
request's gateway. Three tasks: receive, step, report.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from ferry.common import wire
from ferry.common.codec import WireError
from ferry.common.config import WorkerConfig
from ferry.common.logging import get_logger
from ferry.common.security import describe, for_process
from ferry.common.zmq_util import Inbox, Outboxes, make_context
from ferry.services.worker import report
from ferry.services.worker.engine.engine import Engine, RequestRejected
from ferry.services.worker.engine.request import RequestOutput
from ferry.services.worker.migration.coordinator import MIGRATION_MESSAGES, MigrationCoordinator
from ferry.services.worker.migration.prefix_pull import PULL_MESSAGES, PrefixPulls
from ferry.services.worker.step_log import StepLog
from ferry.services.worker.stepper import make_stepper

# Who may send what (checked per message when the cluster has keys; common/security.py):
# the scheduler places and steers, a gateway dispatches and aborts in bypass mode, a peer
# worker runs the migration protocol (and forwards an abort to where a request moved).
SCHEDULER = frozenset({"scheduler"})
INBOX_SENDERS = {
    wire.Dispatch: frozenset({"scheduler", "gateway"}),
    wire.Abort: frozenset({"scheduler", "gateway", "worker"}),
    wire.SetDraining: SCHEDULER,
    wire.ReRegister: SCHEDULER,
    wire.GatewayGone: SCHEDULER,
    wire.CacheSnapshotRequest: SCHEDULER,
    wire.MigrateOut: SCHEDULER,
    wire.PullPrefix: SCHEDULER,
    **{t: frozenset({"worker"}) for t in MIGRATION_MESSAGES if t is not wire.MigrateOut},
    **{t: frozenset({"worker"}) for t in PULL_MESSAGES},
}
LEAVING_LINGER_MS = 500  # at exit, how long the Leaving message may take to go out
SEND_FAILURE_LOG_INTERVAL_S = 5.0  # one log line per address and this many seconds


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.log = get_logger(instance_id=config.instance_id)
        ctx = make_context()
        self.keys = for_process(ctx, config.keys_dir, config.key_name, "worker")
        self.recv_from_peers = Inbox(ctx, config.inbox.bind, allowed=INBOX_SENDERS,
                                     max_frame_bytes=config.max_frame_bytes, keys=self.keys)
        self.send_to_peers = Outboxes(ctx, keys=self.keys)
        self.step_log = StepLog(config.step_log) if config.step_log else None
        self.stepper = make_stepper(engine, self.step_log)
        self.migrations = MigrationCoordinator(
            config=config, engine=engine, send=self._send, on_request_placed=self._work_arrived
        )
        # Prefix pulls share the migrations' KV groups (and their per-peer locks).
        self.pulls = PrefixPulls(config=config, engine=engine, kv=self.migrations.kv,
                                 send=self._send, run_dispatch=self.handle_dispatch,
                                 group_locks=self.migrations.prealloc_locks)
        self.draining = False
        self.num_dispatch_received = 0
        self.report_seq = 0
        self._work = asyncio.Event()
        self._stopping = asyncio.Event()
        self._handlers: dict[type, Callable[[Any], None]] = {
            wire.Dispatch: self.handle_dispatch,
            wire.Abort: self.handle_abort,
            wire.SetDraining: self.handle_set_draining,
            wire.ReRegister: self.handle_reregister,
            wire.GatewayGone: self.handle_gateway_gone,
            wire.CacheSnapshotRequest: self.handle_cache_snapshot_request,
            wire.PullPrefix: self.pulls.start,
        }
        self._cache_snapshot_wanted = False  # the next report sends the whole cache
        self.num_send_failed = 0  # messages not sent: the peer's queue full, or no such peer
        self._leave_task: asyncio.Task | None = None  # draining after SIGTERM
        self._send_failures_logged: dict[str, float] = {}  # addr -> monotonic, last logged
        self._handlers.update(dict.fromkeys(MIGRATION_MESSAGES, self.migrations.handle))
        self._handlers.update(dict.fromkeys(PULL_MESSAGES, self.pulls.handle))

    # ---- loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._register()
        self.log.info("worker_ready", inbox=self.config.inbox.advertise,
                      **describe(self.keys, self.config.inbox.bind),
                      num_blocks=self.engine.blocks.num_total, pid=os.getpid())
        tasks = [
            asyncio.create_task(self._recv_loop(), name="recv"),
            asyncio.create_task(self._step_loop(), name="step"),
            asyncio.create_task(self._report_loop(), name="report"),
        ]
        await self._stopping.wait()
        for task in [*tasks, *filter(None, [self._leave_task])]:
            task.cancel()
        await self.pulls.close()
        await self.migrations.close()
        # The scheduler forgets this instance now: gateways replay anything left here at
        # once, not after the heartbeat timeout.
        self._send(self.config.scheduler_addr,
                   wire.Leaving(instance_id=self.config.instance_id, done=True))
        self.recv_from_peers.close()
        self.send_to_peers.close(linger_ms=LEAVING_LINGER_MS)
        if self.step_log is not None:
            self.step_log.close()

    def stop(self) -> None:
        """Exit now (SIGINT)."""
        self._stopping.set()

    def leave(self) -> None:
        """Exit once empty (SIGTERM): take no new requests, have the scheduler migrate
        every request here away, stop when none is left or after drain_timeout_s."""
        if self._leave_task is None:
            self.draining = True
            self._leave_task = asyncio.get_running_loop().create_task(self._leave())

    async def _leave(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        self.log.info("leaving", num_requests=len(self.engine.requests),
                      drain_timeout_s=self.config.drain_timeout_s)
        while self.engine.has_unfinished() or self.migrations.num_outgoing:
            if time.monotonic() >= deadline:
                self.log.warning("drain_timed_out", num_left=len(self.engine.requests))
                break
            self._send(self.config.scheduler_addr,
                       wire.Leaving(instance_id=self.config.instance_id, done=False))
            await asyncio.sleep(self.config.report_interval_s)
        self.stop()

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv_from_peers.recv()
            try:
                self._handlers[type(msg)](msg)
            except Exception:
                self.log.exception("handler_failed", message=type(msg).__name__)

    async def _step_loop(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._work.clear()
                await self._work.wait()
                continue
            try:
                outputs = await self.stepper.step()
            except Exception:
                self.log.exception("step_failed")
                self._fail_all("engine step failed")
                continue
            self._send_outputs(outputs)
            self.migrations.after_step(outputs, started_s=self.stepper.started_s)
            await asyncio.sleep(0)  # let the inbox run between steps

    async def _report_loop(self) -> None:
        while True:
            self._report()
            await asyncio.sleep(self.config.report_interval_s)

    # ---- handlers -------------------------------------------------------------------------

    def handle_dispatch(self, msg: wire.Dispatch) -> None:
        self.num_dispatch_received += 1
        # The scheduler read the header only: the body is checked here, and must be the
        # header's request (the scheduler placed and counted it by the header).
        try:
            body = wire.decode_body(msg, self.config.max_frame_bytes)
        except WireError as err:
            self._refuse_dispatch(msg, err.code, err.message)
            return
        why = msg.mismatch(body)
        if why is not None:
            self._refuse_dispatch(msg, 400, why)
            return
        held = self.engine.get(msg.req_id)
        if held is not None:
            if held.attempt >= msg.attempt:
                self.log.info("dispatch_duplicate_ignored", req_id=msg.req_id,
                              attempt=msg.attempt, held_attempt=held.attempt)
                return
            # A newer attempt (a replay after this instance was thought dead, a re-dispatch
            # after a scheduler restart): the old copy's output would be dropped anyway.
            self._drop(msg.req_id, reason=f"replaced by attempt {msg.attempt}")
        try:
            self.engine.add_request(
                msg.req_id,
                body.prompt_token_ids,
                body.sampling,
                priority=msg.priority,
                output_token_ids=body.output_token_ids,
                arrival_s=body.arrival_s,
                reply_addr=msg.reply_addr,
                attempt=msg.attempt,
            )
        except (RequestRejected, ValueError) as err:
            code = getattr(err, "code", 400)
            self._send(msg.reply_addr, wire.RequestError(
                req_id=msg.req_id, instance_id=self.config.instance_id, code=code,
                message=str(err), attempt=msg.attempt))
            return
        self._work_arrived()

    def _refuse_dispatch(self, msg: wire.Dispatch, code: int, why: str) -> None:
        """A Dispatch whose body is malformed or another request's: its gateway is told
        (RequestError of the header's attempt), nothing runs."""
        self.log.warning("dispatch_body_refused", req_id=msg.req_id, code=code, error=why)
        self._send(msg.reply_addr, wire.RequestError(
            req_id=msg.req_id, instance_id=self.config.instance_id, code=code,
            message=f"Dispatch body refused: {why}", attempt=msg.attempt))

    def handle_abort(self, msg: wire.Abort) -> None:
        pull = self.pulls.waiting(msg.req_id)
        if pull is not None and msg.attempt in (None, pull.msg.dispatch.attempt):
            pull.cancelled = True  # its copy goes on, into the cache; it is never queued
        held = self.engine.get(msg.req_id)
        if held is not None and msg.attempt is not None and held.attempt != msg.attempt:
            return  # meant for another copy of the request
        self.migrations.cancel_request(msg.req_id, reason=f"aborted: {msg.reason}",
                                       attempt=msg.attempt)
        out = self.engine.abort(msg.req_id)
        if out is not None:
            self._send_outputs([out])

    def handle_gateway_gone(self, msg: wire.GatewayGone) -> None:
        """Nobody reads these requests' output any more: drop them and free their KV."""
        gone = [r.req_id for r in self.engine.requests.values()
                if r.reply_addr == msg.inbox_addr and r.req_id.startswith(msg.req_id_prefix)]
        for req_id in self.pulls.req_ids():
            dispatch = self.pulls.waiting(req_id).msg.dispatch
            if dispatch.reply_addr == msg.inbox_addr and req_id.startswith(msg.req_id_prefix):
                self.pulls.cancel(req_id)
        for req_id in gone:
            self._drop(req_id, reason="gateway gone")
        self.log.info("gateway_gone", gateway_inbox=msg.inbox_addr, num_dropped=len(gone))

    def handle_cache_snapshot_request(self, msg: wire.CacheSnapshotRequest) -> None:
        self._cache_snapshot_wanted = True

    def _drop(self, req_id: str, *, reason: str) -> None:
        """End a request here with no output (its blocks return to the free pool)."""
        self.migrations.cancel_request(req_id, reason=reason)
        self.engine.abort(req_id)

    def handle_set_draining(self, msg: wire.SetDraining) -> None:
        self.draining = msg.draining
        self.log.info("draining", draining=msg.draining)

    def handle_reregister(self, msg: wire.ReRegister) -> None:
        self.log.info("reregister", scheduler_epoch=msg.scheduler_epoch)
        self._register()

    # ---- outbound ---------------------------------------------------------------------

    def _send(self, addr: str, msg: Any) -> None:
        """Queue msg for addr; a message that cannot be queued (the peer's queue is full,
        or no socket can reach addr) is counted and logged, at most once per address every
        SEND_FAILURE_LOG_INTERVAL_S, and never raises into the loop that sends it."""
        try:
            self.send_to_peers.send(addr, msg)
        except Exception as err:  # Overloaded, BadAddress, or a bug: contained to this msg
            self.num_send_failed += 1
            now = time.monotonic()
            last = self._send_failures_logged.get(addr)
            if last is None or now - last >= SEND_FAILURE_LOG_INTERVAL_S:
                if len(self._send_failures_logged) > 1024:
                    self._send_failures_logged.clear()
                self._send_failures_logged[addr] = now
                self.log.warning("send_failed", addr=addr, message=type(msg).__name__,
                                 error=str(err), num_send_failed=self.num_send_failed)

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._send(out.reply_addr, wire.Tokens(
                req_id=out.req_id,
                instance_id=self.config.instance_id,
                first_index=out.first_index,
                token_ids=out.token_ids,
                finish_reason=out.finish_reason,
                attempt=out.attempt,
                logprobs=out.logprobs,
                num_cached_prompt_tokens=out.num_cached_prompt_tokens,
            ))

    def _fail_all(self, message: str) -> None:
        for req in list(self.engine.requests.values()):
            self.engine.abort(req.req_id)
            self._send(req.reply_addr, wire.RequestError(
                req_id=req.req_id, instance_id=self.config.instance_id, code=500,
                message=message, attempt=req.attempt))

    def _register(self) -> None:
        self._send(self.config.scheduler_addr, report.register(
            self.engine, instance_id=self.config.instance_id,
            inbox_addr=self.config.inbox.advertise, kv_block_bytes=self.migrations.kv.block_bytes,
            pulling=self._pulling(), model_name=self.config.model_name))

    def _report(self) -> None:
        self.report_seq += 1
        self._send(self.config.scheduler_addr, report.load_report(
            self.engine, instance_id=self.config.instance_id,
            inbox_addr=self.config.inbox.advertise, seq=self.report_seq,
            report_interval_s=self.config.report_interval_s,
            num_dispatch_received=self.num_dispatch_received,
            num_migrations_in=self.migrations.num_incoming,
            num_migrations_out=self.migrations.num_outgoing, draining=self.draining,
            pulling=self._pulling(), snapshot_wanted=self._cache_snapshot_wanted))
        self._cache_snapshot_wanted = False

    def _pulling(self) -> dict[str, int]:
        """req_id -> priority of the requests waiting here for their prefix pull."""
        return {req_id: self.pulls.waiting(req_id).msg.dispatch.priority
                for req_id in self.pulls.req_ids()}

    def _work_arrived(self) -> None:
        self._work.set()


async def serve(config: WorkerConfig, engine: Engine) -> None:
    worker = Worker(config, engine)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, worker.stop)
    loop.add_signal_handler(signal.SIGTERM, worker.leave)  # supervisors: drain first
    await worker.run()
