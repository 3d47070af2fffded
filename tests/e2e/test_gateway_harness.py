"""Test harness for the gateway's sockets (no tests here): a gateway on the test's event
loop, and a fake scheduler + fake workers speaking the real wire protocol.

    fake scheduler  PULL at config.scheduler_addr   Dispatch -> a worker, Placement and
                                                    InstanceView -> gateway inbox (like the
                                                    real one, it learns a gateway from its
                                                    first Dispatch or GatewayHello)
    fake worker     PULL at its own inbox           Dispatch (bypass), Abort
                    PUSH to Dispatch.reply_addr     Tokens: output index i is script[i]
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import uvloop
import zmq
import zmq.asyncio

from ferry.common import wire
from ferry.common.config import Endpoint, GatewayConfig
from ferry.common.sampling import TokenLogprobs
from ferry.common.text import TextModel
from ferry.services.gateway.main import Gateway

SCRIPT_TEXT = "the quick brown fox jumps over the lazy dog. hello world! "


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


async def wait_until(cond, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class WorkerBehaviour:
    hold: bool = False  # accept requests but never produce a token
    token_delay_s: float = 0.0  # pause before each Tokens message
    chunk_size: int = 2  # tokens per Tokens message
    duplicate: bool = False  # send every Tokens message twice (as a migration might)
    die_after: int | None = None  # stop producing after this many output tokens
    eos_at: int | None = None  # emit EOS at this output index, finish "stop"
    num_cached_prompt_tokens: int | None = None  # reported with output index 0


def fake_logprobs(token_id: int, k: int) -> TokenLogprobs:
    """A fake worker's logprobs: the sampled token at -0.25, then ids 10, 11, ... lower."""
    return TokenLogprobs(logprob=-0.25, top_token_ids=tuple(range(10, 10 + k)),
                         top_logprobs=tuple(-1.0 - i for i in range(k)))


class FakeWorker:
    def __init__(self, cluster: FakeCluster, instance_id: str, port: int) -> None:
        self.cluster = cluster
        self.instance_id = instance_id
        self.inbox_addr = tcp(port)
        self.behaviour = WorkerBehaviour()
        self.recv_from_peers = cluster.ctx.socket(zmq.PULL)
        self.recv_from_peers.bind(self.inbox_addr)
        self.direct_dispatches: list[wire.Dispatch] = []  # bypass mode
        self.aborts: list[wire.Abort] = []
        self.tasks: dict[str, asyncio.Task] = {}

    async def serve(self) -> None:
        while True:
            msg = wire.decode(await self.recv_from_peers.recv_multipart())
            if isinstance(msg, wire.Dispatch):
                self.direct_dispatches.append(msg)
                self.start(msg)
            elif isinstance(msg, wire.Abort):
                self.aborts.append(msg)
                self.abort(msg.req_id)

    def start(self, dispatch: wire.Dispatch) -> None:
        self.tasks[dispatch.req_id] = asyncio.get_running_loop().create_task(self.run(dispatch))

    def abort(self, req_id: str) -> None:
        task = self.tasks.pop(req_id, None)
        if task is not None:
            task.cancel()

    async def run(self, dispatch: wire.Dispatch) -> None:
        b = self.behaviour
        body = wire.decode_body(dispatch)
        assert dispatch.mismatch(body) is None
        if b.hold:
            await asyncio.Event().wait()
        first = len(body.output_token_ids)
        end = body.sampling.max_tokens  # replayed outputs count towards max_tokens
        index = first
        while index < end:
            if b.die_after is not None and index >= b.die_after:
                return  # silently dead: the scheduler will declare it down
            if b.token_delay_s:
                await asyncio.sleep(b.token_delay_s)
            ids = [self.cluster.script[i % len(self.cluster.script)]
                   for i in range(index, min(index + b.chunk_size, end))]
            finish = "length" if index + len(ids) == end else None
            if b.eos_at is not None and index <= b.eos_at < index + len(ids):
                ids = ids[: b.eos_at - index] + [self.cluster.eos_id]
                finish = "stop"
            k = body.sampling.logprobs
            logprobs = () if k is None else tuple(fake_logprobs(t, k) for t in ids)
            msg = wire.Tokens(req_id=dispatch.req_id, instance_id=self.instance_id,
                              first_index=index, token_ids=tuple(ids), finish_reason=finish,
                              attempt=dispatch.attempt, logprobs=logprobs,
                              num_cached_prompt_tokens=(b.num_cached_prompt_tokens if index == 0
                                                        else None))
            for _ in range(2 if b.duplicate else 1):
                await self.cluster.push(dispatch.reply_addr, msg)
            index += len(ids)
            if finish is not None:
                break
            await asyncio.sleep(0)
        self.tasks.pop(dispatch.req_id, None)

    def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.recv_from_peers.close(linger=0)


class FakeCluster:
    def __init__(self, config: GatewayConfig, text: TextModel, *, num_workers: int = 1) -> None:
        self.config = config
        self.ctx = zmq.asyncio.Context.instance()
        self.script = text.encode(SCRIPT_TEXT, add_special_tokens=False)
        self.eos_id = text.eos_token_ids[0]
        self.recv_from_gateway = self.ctx.socket(zmq.PULL)
        self.recv_from_gateway.bind(config.scheduler_addr)
        self.workers = [FakeWorker(self, f"w{i}", port)
                        for i, port in enumerate(free_ports(num_workers))]
        self._push: dict[str, zmq.asyncio.Socket] = {}
        self.gateways: list[str] = []  # inboxes learned from Dispatch.reply_addr
        self.headers: list[wire.Dispatch] = []  # the Dispatches it got
        self.dispatches: list[wire.DispatchBody] = []  # and their bodies (the requests)
        self.hellos: list[wire.GatewayHello] = []  # gateways announcing themselves
        self.releases: list[wire.Release] = []
        self.alive = True  # False: the scheduler neither answers nor sends views
        self.down: set[str] = set()  # instances declared dead
        self.reject_code: int | None = None  # answer every Dispatch with DispatchRejected
        self.reject_next: list[int] = []  # codes to refuse the next Dispatches with
        self.epoch = "e1"  # the scheduler epoch its views carry (a new one: it restarted)
        self.hold = False  # keep Dispatches unanswered (a scheduler holding them pending)
        self.view_interval_s = 0.05
        self._next = 0
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.serve()), loop.create_task(self.send_views())]
        self.tasks += [loop.create_task(w.serve()) for w in self.workers]

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for worker in self.workers:
            worker.close()
        for sock in self._push.values():
            sock.close(linger=0)
        self.recv_from_gateway.close(linger=0)

    async def push(self, addr: str, msg: object) -> None:
        await self.push_frames(addr, wire.encode(msg))

    async def push_frames(self, addr: str, frames: list[bytes]) -> None:
        sock = self._push.get(addr)
        if sock is None:
            sock = self._push[addr] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
        await sock.send_multipart(frames)

    def view(self) -> wire.InstanceView:
        return wire.InstanceView(scheduler_epoch=self.epoch, instances=tuple(
            wire.InstanceAddr(instance_id=w.instance_id, inbox_addr=w.inbox_addr)
            for w in self.workers))

    async def send_views(self) -> None:
        while True:
            if self.alive:
                for addr in self.gateways:
                    await self.push(addr, self.view())
            await asyncio.sleep(self.view_interval_s)

    async def serve(self) -> None:
        while True:
            msg = wire.decode(await self.recv_from_gateway.recv_multipart())
            if isinstance(msg, wire.GatewayHello):
                self.hellos.append(msg)
            if not self.alive:
                continue
            gateway_addr = getattr(msg, "reply_addr", None) or getattr(msg, "inbox_addr", None)
            if gateway_addr and gateway_addr not in self.gateways:
                self.gateways.append(gateway_addr)
                await self.push(gateway_addr, self.view())
            if isinstance(msg, wire.Dispatch):
                self.headers.append(msg)
                self.dispatches.append(wire.decode_body(msg))
                await self.on_dispatch(msg)
            elif isinstance(msg, wire.Release):
                self.releases.append(msg)
                for worker in self.workers:
                    worker.abort(msg.req_id)

    async def on_dispatch(self, msg: wire.Dispatch) -> None:
        if self.hold:
            return
        reply = msg.reply_addr
        code = self.reject_next.pop(0) if self.reject_next else self.reject_code
        if code is not None:
            await self.push(reply, wire.DispatchRejected(
                req_id=msg.req_id, code=code, message="no instance can take it"))
            return
        live = [w for w in self.workers if w.instance_id not in self.down]
        worker = live[self._next % len(live)]
        self._next += 1
        await self.push(reply, wire.Placement(req_id=msg.req_id, instance_id=worker.instance_id))
        worker.start(msg)

    async def instance_down(self, worker: FakeWorker) -> None:
        self.down.add(worker.instance_id)
        for addr in self.gateways:
            await self.push(addr, wire.InstanceDown(instance_id=worker.instance_id))

    def release_reasons(self, req_id: str | None = None) -> list[str]:
        return [r.reason for r in self.releases if req_id is None or r.req_id == req_id]


def gateway_config(model_dir: Path, **overrides) -> GatewayConfig:
    sdk, inbox, scheduler = free_ports(3)
    config = GatewayConfig(
        gateway_id="gw",
        http_host="127.0.0.1",
        http_port=0,
        sdk=Endpoint(bind=tcp(sdk), advertise=tcp(sdk)),
        inbox=Endpoint(bind=tcp(inbox), advertise=tcp(inbox)),
        scheduler_addr=tcp(scheduler),
        model=str(model_dir),
        model_name="tiny",
    )
    return replace(config, **overrides)


@dataclass
class Harness:
    gateway: Gateway
    cluster: FakeCluster
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def sdk_addr(self) -> str:
        return self.gateway.config.sdk.advertise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http.port}"

    @property
    def worker(self) -> FakeWorker:
        return self.cluster.workers[0]

    async def wait_idle(self) -> None:
        await wait_until(lambda: len(self.gateway.table) == 0, what="no requests in flight")


@contextlib.asynccontextmanager
async def running(model_dir: Path, *, num_workers: int = 1, scheduler_alive: bool = True,
                  **overrides):
    """A gateway and a fake cluster on this loop; yields a Harness once the gateway has
    the scheduler's first view (unless the scheduler starts silent)."""
    config = gateway_config(model_dir, **overrides)
    text = TextModel.load(model_dir)
    cluster = FakeCluster(config, text, num_workers=num_workers)
    cluster.alive = scheduler_alive
    gateway = Gateway(config, text)
    task = asyncio.get_running_loop().create_task(gateway.run())
    cluster.start()
    try:
        await wait_until(lambda: gateway.http.port != 0 or task.done(), what="gateway start")
        if task.done():
            task.result()
        if scheduler_alive:
            await wait_until(lambda: gateway.routes.view is not None, what="first view")
        yield Harness(gateway, cluster)
    finally:
        cluster.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class ThreadedHarness:
    """`running(...)` on a background uvloop thread, for blocking clients."""

    def __init__(self, model_dir: Path, **kwargs) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._cm = running(model_dir, **kwargs)

    def __enter__(self) -> Harness:
        self.thread.start()
        return self.call(self._cm.__aenter__())

    def __exit__(self, *exc) -> None:
        self.call(self._cm.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)
