"""The worker process: one model instance (a "llumlet" in the paper).

Wraps the pure engine with ZMQ: one PULL inbox for the scheduler, gateways (bypass
mode) and peer workers (migration control); PUSH outboxes to the scheduler and to each
request's gateway. Three tasks: receive, step, report.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

from ferry.common import wire
from ferry.common.config import WorkerConfig
from ferry.common.logging import get_logger
from ferry.common.zmq_util import Inbox, Outboxes, Overloaded, make_context
from ferry.services.worker.engine.engine import Engine, RequestRejected
from ferry.services.worker.engine.request import RequestOutput
from ferry.services.worker.migration.coordinator import MIGRATION_MESSAGES, MigrationCoordinator
from ferry.services.worker.report import load_fields
from ferry.services.worker.stepper import make_stepper

INBOX_MESSAGES = (
    wire.Dispatch,
    wire.Abort,
    wire.SetDraining,
    wire.ReRegister,
    *MIGRATION_MESSAGES,
)


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.log = get_logger(instance_id=config.instance_id)
        ctx = make_context()
        self.recv_from_peers = Inbox(
            ctx, config.inbox.bind, expected=INBOX_MESSAGES, max_frame_bytes=config.max_frame_bytes
        )
        self.send_to_peers = Outboxes(ctx)
        self.stepper = make_stepper(engine)
        self.migrations = MigrationCoordinator(
            config=config, engine=engine, send=self._send, on_request_placed=self._work_arrived
        )
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
        }
        self._handlers.update(dict.fromkeys(MIGRATION_MESSAGES, self.migrations.handle))

    # ---- loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._register()
        self.log.info("worker_ready", inbox=self.config.inbox.advertise,
                      num_blocks=self.engine.blocks.num_total, pid=os.getpid())
        tasks = [
            asyncio.create_task(self._recv_loop(), name="recv"),
            asyncio.create_task(self._step_loop(), name="step"),
            asyncio.create_task(self._report_loop(), name="report"),
        ]
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        await self.migrations.close()
        self.recv_from_peers.close()
        self.send_to_peers.close()

    def stop(self) -> None:
        self._stopping.set()

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
        try:
            self.engine.add_request(
                msg.req_id,
                msg.prompt_token_ids,
                msg.sampling,
                priority=msg.priority,
                output_token_ids=msg.output_token_ids,
                arrival_s=msg.arrival_s,
                reply_addr=msg.reply_addr,
            )
        except (RequestRejected, ValueError) as err:
            code = getattr(err, "code", 400)
            self._send(msg.reply_addr, wire.RequestError(
                req_id=msg.req_id, instance_id=self.config.instance_id, code=code, message=str(err)))
            return
        self._work_arrived()

    def handle_abort(self, msg: wire.Abort) -> None:
        self.migrations.cancel_request(msg.req_id, reason=f"aborted: {msg.reason}")
        out = self.engine.abort(msg.req_id)
        if out is not None:
            self._send_outputs([out])

    def handle_set_draining(self, msg: wire.SetDraining) -> None:
        self.draining = msg.draining
        self.log.info("draining", draining=msg.draining)

    def handle_reregister(self, msg: wire.ReRegister) -> None:
        self.log.info("reregister", scheduler_epoch=msg.scheduler_epoch)
        self._register()

    # ---- outbound ---------------------------------------------------------------------

    def _send(self, addr: str, msg: Any) -> None:
        try:
            self.send_to_peers.send(addr, msg)
        except Overloaded:
            self.log.warning("send_dropped", addr=addr, message=type(msg).__name__)

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._send(out.reply_addr, wire.Tokens(
                req_id=out.req_id,
                instance_id=self.config.instance_id,
                first_index=out.first_index,
                token_ids=out.token_ids,
                finish_reason=out.finish_reason,
            ))

    def _fail_all(self, message: str) -> None:
        for req in list(self.engine.requests.values()):
            self.engine.abort(req.req_id)
            self._send(req.reply_addr, wire.RequestError(
                req_id=req.req_id, instance_id=self.config.instance_id, code=500,
                message=message))

    def _register(self) -> None:
        self._send(self.config.scheduler_addr, wire.Register(
            instance_id=self.config.instance_id,
            inbox_addr=self.config.inbox.advertise,
            num_blocks=self.engine.blocks.num_total,
            block_size=self.engine.blocks.block_size,
            max_model_len=self.engine.executor.max_model_len,
            req_ids=tuple(self.engine.requests),
            req_priorities=tuple(r.priority for r in self.engine.requests.values()),
        ))

    def _report(self) -> None:
        load = self.engine.load()
        self.report_seq += 1
        self._send(self.config.scheduler_addr, wire.LoadReport(
            instance_id=self.config.instance_id,
            inbox_addr=self.config.inbox.advertise,
            seq=self.report_seq,
            num_dispatch_received=self.num_dispatch_received,
            load=load_fields(load, num_migrations_in=self.migrations.num_incoming,
                             num_migrations_out=self.migrations.num_outgoing,
                             draining=self.draining),
        ))

    def _work_arrived(self) -> None:
        self._work.set()


async def serve(config: WorkerConfig, engine: Engine) -> None:
    worker = Worker(config, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
