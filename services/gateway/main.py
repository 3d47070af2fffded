"""The gateway process loop (DESIGN §1, §2, §7): one asyncio program that

    recv_from_cluster   PULL   Tokens, RequestError (workers); Placement, DispatchRejected,
                               InstanceView, InstanceDown (scheduler)
    send_to_cluster     PUSH   Dispatch, Release -> scheduler; Dispatch, Abort -> workers
                               in bypass mode
    sdk                 ROUTER ferry SDK clients (sdk.py)
    http                       OpenAI-compatible API (http_api.py)

Both front ends call `submit` / `abort`; the request table (requests.py) decides what
reaches each client; each request's sink (one per front end) carries it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import zmq

from ferry.common import wire
from ferry.common.config import GatewayConfig
from ferry.common.logging import get_logger
from ferry.common.sampling import SamplingParams
from ferry.common.security import KEYLESS, describe, for_process
from ferry.common.text import TextModel
from ferry.common.zmq_util import Inbox, Outboxes, Overloaded, frames_and_sender, make_context
from ferry.services.gateway.frontend import Sink
from ferry.services.gateway.http_api import HttpApi
from ferry.services.gateway.metrics import GatewayMetrics
from ferry.services.gateway.pool import WorkPool
from ferry.services.gateway.recv import MAX_BATCH, recv_batches
from ferry.services.gateway.requests import (
    RELEASE_FINISHED,
    BadStream,
    Delta,
    Rejected,
    Request,
    RequestTable,
    check_request,
)
from ferry.services.gateway.routing import Routes
from ferry.services.gateway.sdk import SdkFrontend

T = TypeVar("T")
log = get_logger()

# Who may send what (checked per message when the cluster has keys; common/security.py).
WORKER, SCHEDULER = frozenset({"worker"}), frozenset({"scheduler"})
CLUSTER_SENDERS = {
    wire.Tokens: WORKER,
    wire.RequestError: WORKER,
    wire.Placement: SCHEDULER,
    wire.DispatchRejected: SCHEDULER,
    wire.InstanceView: SCHEDULER,
    wire.InstanceDown: SCHEDULER,
}
SWEEP_INTERVAL_S = 0.05  # timeouts and the bypass check run this often
PROBE_INTERVAL_S = 0.5  # announce this gateway to the scheduler this often until a view comes
HELLO_INTERVAL_S = 1.0  # then this often: the scheduler's heartbeat of this gateway
MAX_ATTEMPTS = 8  # dispatches of one request (first run, replays); then it fails with 503
MAX_STALE_TOLD = 4096  # (req_id, attempt, instance) stale copies told to stop, remembered


class Gateway:
    def __init__(self, config: GatewayConfig, text: TextModel) -> None:
        ctx = make_context()
        self.keys = for_process(ctx, config.keys_dir, config.key_name, "gateway")
        self.config = config
        self.text = text
        self.metrics = GatewayMetrics(config.model_name)
        self.table = RequestTable(
            text, gateway_id=config.gateway_id, reply_addr=config.inbox.advertise
        )
        self.routes = Routes(bypass_after_s=config.bypass_after_s, now=time.monotonic())
        self.recv_from_cluster = Inbox(ctx, config.inbox.bind, allowed=CLUSTER_SENDERS,
                                       max_frame_bytes=config.max_frame_bytes, keys=self.keys)
        # A synchronous view of the context: a non-blocking send on a sync socket raises
        # zmq.Again (-> Overloaded) at once; on a zmq.asyncio socket it would not.
        self.send_to_cluster = Outboxes(zmq.Context.shadow(ctx.underlying), keys=self.keys)
        self.cluster_backlogged = False  # the inbox had more queued than one batch takes
        # Large bodies parsed and long prompts tokenized off the loop (bounded, then 429).
        self.pool = WorkPool(config.num_tokenizer_threads, config.max_tokenizer_queue)
        self.num_tokenizing = 0  # requests in the pool (not yet submitted)
        self.stale_told: dict[tuple[str, int, str], None] = {}  # see stop_stale_copy
        self.sdk = SdkFrontend(self, ctx)
        self.http = HttpApi(self)
        self.cluster_handlers = {
            wire.Tokens: self.handle_tokens,
            wire.RequestError: self.handle_request_error,
            wire.Placement: self.handle_placement,
            wire.DispatchRejected: self.handle_dispatch_rejected,
            wire.InstanceView: self.handle_instance_view,
            wire.InstanceDown: self.handle_instance_down,
        }

    async def run(self) -> None:
        """Serve until cancelled."""
        try:
            await self.http.start()
            log.info(
                "gateway_ready", http=f"http://{self.config.http_host}:{self.http.port}",
                sdk=self.config.sdk.advertise, inbox=self.config.inbox.advertise,
                scheduler=self.config.scheduler_addr,
                **describe(self.keys, self.config.inbox.bind),
            )
            await asyncio.gather(self.serve_cluster(), self.sdk.serve(), self.sweep())
        finally:
            await self.http.stop()
            self.close()

    def close(self) -> None:
        self.pool.close()
        self.sdk.close()
        self.recv_from_cluster.close()
        self.send_to_cluster.close()

    async def serve_cluster(self) -> None:
        inbox, handlers = self.recv_from_cluster, self.cluster_handlers
        async for batch in recv_batches(inbox.socket, MAX_BATCH, copy=inbox.keys is None):
            # A full batch means more is queued: scheduler messages may be waiting behind
            # tokens, so its silence proves nothing (see sweep).
            self.cluster_backlogged = len(batch) == MAX_BATCH
            for frames in batch:
                msg = inbox.accept(*(frames_and_sender(frames) if inbox.keys is not None
                                     else (frames, KEYLESS)))
                if msg is None:
                    continue  # malformed, or from a sender that may not send it (logged)
                try:
                    handlers[type(msg)](msg)
                except Exception:
                    log.exception("cluster_handler_failed", message=type(msg).__name__)

    async def sweep(self) -> None:
        last_probe = -PROBE_INTERVAL_S
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for req in self.table.expired(now):
                self.deliver(self.table.finish(req.req_id, "timeout"))
            interval = PROBE_INTERVAL_S if self.routes.view is None else HELLO_INTERVAL_S
            if now - last_probe >= interval:
                last_probe = now
                self.announce()
            if not self.cluster_backlogged and self.routes.check(now):
                self.metrics.bypass.set(1)
                lost = self.table.never_placed()
                log.warning(
                    "bypass_mode_on", silent_s=round(now - self.routes.last_heard, 3),
                    num_instances=self.routes.num_instances, num_redispatched=len(lost),
                )
                # What still waits in the queue to the silent scheduler would reach its
                # successor (ZMQ keeps it for the reconnection) and run again there: drop it.
                self.send_to_cluster.drop(self.config.scheduler_addr)
                # Sent to the scheduler before it fell silent, with no word back: they may
                # be lost with it, so they go straight to the workers now (a new attempt:
                # a copy the scheduler did forward cannot reach the client).
                for req in lost:
                    self.replay(req, "re-dispatch in bypass mode")

    def announce(self) -> None:
        """Tell the scheduler this gateway lives (its heartbeat, HELLO_INTERVAL_S): it
        learns the inbox and sends instance views before the first request, and it tells
        the workers to drop this process's requests once the hellos stop."""
        try:
            self.send_to_cluster.send(self.config.scheduler_addr, wire.GatewayHello(
                gateway_id=self.config.gateway_id, inbox_addr=self.config.inbox.advertise,
                req_id_prefix=self.table.id_prefix))
        except Overloaded:
            pass  # the scheduler is not reading: the next hello tries again

    # ---- front ends -------------------------------------------------------------------

    def submit(
        self,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingParams,
        *,
        priority: int,
        timeout_s: float | None,
        stream: bool,
        sink: Sink,
    ) -> Request:
        """Admit and dispatch a request; raises Rejected (400, 429, 503). `stream`: the
        client wants text with every delta, not only at the end."""
        self.check_capacity()
        if timeout_s is not None and not timeout_s > 0:
            raise Rejected(400, f"timeout_s must be > 0, got {timeout_s}")
        check_request(
            prompt_token_ids, sampling, max_model_len=self.text.max_model_len,
            vocab_size=self.text.vocab_size, max_tokens_limit=self.config.max_tokens_limit,
        )
        req = self.table.add(
            prompt_token_ids=prompt_token_ids, sampling=sampling, priority=priority,
            timeout_s=timeout_s or self.config.default_timeout_s, sink=sink,
            now=time.monotonic(), arrival_s=time.time(), stream=stream,
        )
        try:
            self.dispatch(req)
        except Rejected:
            self.table.remove(req.req_id)
            raise
        self.metrics.inflight.inc()
        return req

    async def tokenize_off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Parse or tokenize a long request in the pool; it counts against max_inflight
        meanwhile. Rejected(429) when the pool's queue is full."""
        self.check_capacity()
        self.num_tokenizing += 1
        try:
            return await self.pool.run(fn, *args)
        finally:
            self.num_tokenizing -= 1

    def check_capacity(self) -> None:
        if len(self.table) + self.num_tokenizing >= self.config.max_inflight:
            raise Rejected(429, f"overloaded: {self.config.max_inflight} requests in flight")

    def abort(self, req_id: str) -> None:
        """The client gave up (cancel, disconnect): finish with "abort" and free the worker."""
        delta = self.table.finish(req_id, "abort")
        if delta is not None:
            self.deliver(delta)

    def health(self) -> tuple[bool, str]:
        return self.routes.health()

    # ---- cluster messages -------------------------------------------------------------

    def handle_tokens(self, msg: wire.Tokens) -> None:
        req = self.table.get(msg.req_id)
        if req is None:
            return  # finished already: a late message
        if req.attempt != msg.attempt:
            self.stop_stale_copy(msg.req_id, msg.attempt, msg.instance_id)
            return
        unasked_abort = msg.finish_reason == "abort"  # the gateway ends aborts itself
        if unasked_abort:
            msg = replace(msg, finish_reason=None)  # keep its tokens, not its ending
        try:
            delta = self.table.on_tokens(msg)
        except BadStream as err:
            self.fail(self.table.get(err.req_id), 500, str(err))
            return
        if delta is not None:
            self.deliver(delta)
        if unasked_abort and self.table.get(msg.req_id) is req:
            self.replay(req, f"{msg.instance_id} dropped it")

    def handle_request_error(self, msg: wire.RequestError) -> None:
        req = self.table.current(msg.req_id, msg.attempt)
        if req is not None:
            self.fail(req, msg.code, f"{msg.instance_id}: {msg.message}")

    def stop_stale_copy(self, req_id: str, attempt: int, instance_id: str) -> None:
        """Output of an earlier attempt: ignored, and its instance is told (once) to drop
        that copy, which would otherwise run to max_tokens for nobody."""
        key = (req_id, attempt, instance_id)
        addr = self.routes.addr_of(instance_id)
        if key in self.stale_told or addr is None:
            return
        self.stale_told[key] = None
        while len(self.stale_told) > MAX_STALE_TOLD:
            del self.stale_told[next(iter(self.stale_told))]
        try:
            self.send_to_cluster.send(addr, wire.Abort(req_id=req_id, reason="stale copy",
                                                       attempt=attempt))
        except Overloaded:
            pass

    def handle_placement(self, msg: wire.Placement) -> None:
        self.routes.heard(time.monotonic())
        self.table.on_placement(msg)

    def handle_dispatch_rejected(self, msg: wire.DispatchRejected) -> None:
        self.routes.heard(time.monotonic())
        req = self.table.get(msg.req_id)
        if req is not None:
            self.fail(req, msg.code, msg.message, release=False)

    def handle_instance_view(self, msg: wire.InstanceView) -> None:
        previous = self.routes.view
        if self.routes.on_view(msg, time.monotonic()):
            self.metrics.bypass.set(0)
            log.warning("bypass_mode_off", scheduler_epoch=msg.scheduler_epoch)
        if previous is not None and previous.scheduler_epoch != msg.scheduler_epoch:
            lost = self.table.unplaced(msg.scheduler_epoch)
            log.info("scheduler_restarted", scheduler_epoch=msg.scheduler_epoch,
                     num_redispatched=len(lost))
            for req in lost:
                self.replay(req, "re-dispatch after a scheduler restart")

    def handle_instance_down(self, msg: wire.InstanceDown) -> None:
        self.routes.heard(time.monotonic())
        addr = self.routes.departed_addr(msg.instance_id)
        if addr is not None:  # (bypass dispatches, stale-copy aborts went there)
            self.send_to_cluster.drop(addr)
        reqs = [req for req in self.table.active() if req.instance_id == msg.instance_id]
        log.warning("instance_down", instance_id=msg.instance_id, num_replayed=len(reqs))
        for req in reqs:
            self.replay(req, f"replay after {msg.instance_id} died")

    def replay(self, req: Request, why: str) -> None:
        """Dispatch a tracked request again as a new attempt (prompt + delivered tokens);
        fail it if refused, or once it has been dispatched MAX_ATTEMPTS times."""
        if req.attempt + 1 >= MAX_ATTEMPTS:
            self.fail(req, 503, f"{why}: interrupted {req.attempt + 1} times, giving up")
            return
        self.table.reset_for_replay(req)
        self.metrics.replays.inc()
        try:
            self.dispatch(req)
        except Rejected as err:
            self.fail(req, err.code, f"{why}: {err.message}")

    # ---- outputs ----------------------------------------------------------------------

    def dispatch(self, req: Request) -> None:
        """Send req's Dispatch to the scheduler, or to a worker in bypass mode."""
        view = self.routes.view
        msg = self.table.dispatch(req, block_size=view.block_size if view else 16,
                                  prefix_seed=view.prefix_seed if view else 0)
        try:
            if not self.routes.bypass:
                self.send_to_cluster.send(self.config.scheduler_addr, msg)
                view = self.routes.view
                req.dispatch_epoch = view.scheduler_epoch if view is not None else None
                return
            worker = self.routes.next_worker()
            if worker is None:
                raise Rejected(503, "no instance available: scheduler silent, none known")
            self.send_to_cluster.send(worker.inbox_addr, msg)
            req.instance_id, req.direct_addr = worker.instance_id, worker.inbox_addr
        except Overloaded as err:
            raise Rejected(429, f"overloaded: {err}") from None

    def release(self, req: Request, reason: str) -> None:
        """Tell the cluster the gateway is done with req (the worker aborts unless it
        finished by itself)."""
        try:
            if req.direct_addr is None and not self.routes.bypass:
                self.send_to_cluster.send(
                    self.config.scheduler_addr, wire.Release(req_id=req.req_id, reason=reason)
                )
                return
            addr = req.direct_addr or self.routes.addr_of(req.instance_id)
            if addr is not None and reason != RELEASE_FINISHED:
                self.send_to_cluster.send(addr, wire.Abort(req_id=req.req_id, reason=reason))
        except Overloaded as err:
            log.warning("release_dropped", req_id=req.req_id, reason=reason, error=str(err))

    def deliver(self, delta: Delta) -> None:
        req = delta.req
        if delta.token_ids:
            now = time.monotonic()
            num_tokens = len(delta.token_ids)
            series = req.series
            if series is None:  # its first token: the instance that delivered it labels it
                req.first_token_time = now
                series = req.series = self.metrics.series(req.instance_id)
                series.ttft.observe(now - req.start_time)
                series.prompt_tokens.inc(len(req.prompt_token_ids))
            else:
                series.inter_token.observe((now - req.last_token_time) / num_tokens)
            req.last_token_time = now
            series.generation_tokens.inc(num_tokens)
        client_alive = req.sink.push(delta)
        if delta.finish_reason is not None:
            self.release(req, delta.release)
            self.metrics.inflight.dec()
            series = req.series or self.metrics.series(None)
            series.success(delta.finish_reason).inc()
            series.e2e.observe(time.monotonic() - req.start_time)
            log.debug("request_finished", req_id=req.req_id, finish_reason=delta.finish_reason,
                      num_output_tokens=req.num_delivered)
        elif not client_alive:
            log.info("client_gone", req_id=req.req_id)
            self.abort(req.req_id)

    def fail(self, req: Request | None, code: int, message: str, *, release: bool = True) -> None:
        if req is None or self.table.remove(req.req_id) is None:
            return
        log.info("request_failed", req_id=req.req_id, code=code, error=message)
        if release:
            self.release(req, "error")
        self.metrics.inflight.dec()
        req.sink.fail(code, message)
