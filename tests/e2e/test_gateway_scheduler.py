"""The gateway with the real scheduler process, and fake workers that register, report
load and answer Dispatch with tokens: start-up (the gateway announces itself), SDK and
HTTP requests, aborts reaching the worker, replay when a worker dies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import uvloop
import zmq
import zmq.asyncio

from ferry import AsyncClient
from ferry.common import wire
from ferry.common.text import TextModel
from ferry.services.gateway.main import Gateway
from tests.e2e.test_gateway_harness import (
    SCRIPT_TEXT,
    free_ports,
    gateway_config,
    tcp,
    wait_until,
)
from tests.unit.test_gateway_text import make_model_dir

REPO = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 1000


class Worker:
    """Registers with the scheduler, reports load every 50 ms, and answers each Dispatch
    with script tokens, one per message every `token_delay_s`."""

    def __init__(self, ctx, instance_id: str, scheduler_addr: str, script: list[int]) -> None:
        self.instance_id = instance_id
        self.inbox_addr = tcp(free_ports(1)[0])
        self.scheduler_addr = scheduler_addr
        self.script = script
        self.token_delay_s = 0.005
        self.reporting = True  # False: silent, the scheduler declares it dead
        self.recv_from_peers = ctx.socket(zmq.PULL)
        self.recv_from_peers.bind(self.inbox_addr)
        self.send_to_scheduler = ctx.socket(zmq.PUSH)
        self.send_to_scheduler.connect(scheduler_addr)
        self.push: dict[str, zmq.asyncio.Socket] = {}
        self.ctx = ctx
        self.runs: dict[str, asyncio.Task] = {}
        self.dispatches: list[wire.DispatchBody] = []  # the requests it got
        self.aborts: list[str] = []
        self.num_received = 0
        self.seq = 0
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.serve()), loop.create_task(self.report())]

    def close(self) -> None:
        for task in [*self.tasks, *self.runs.values()]:
            task.cancel()
        for sock in [self.recv_from_peers, self.send_to_scheduler, *self.push.values()]:
            sock.close(linger=0)

    async def report(self) -> None:
        await self.send_to_scheduler.send_multipart(wire.encode(wire.Register(
            instance_id=self.instance_id, inbox_addr=self.inbox_addr, num_blocks=NUM_BLOCKS,
            block_size=16, max_model_len=256, req_ids=())))
        while True:
            await asyncio.sleep(0.05)
            if not self.reporting:
                continue
            self.seq += 1
            await self.send_to_scheduler.send_multipart(wire.encode(wire.LoadReport(
                instance_id=self.instance_id, inbox_addr=self.inbox_addr, seq=self.seq,
                num_dispatch_received=self.num_received, load=wire.LoadFields(
                    num_total_blocks=NUM_BLOCKS, num_free_blocks=NUM_BLOCKS - len(self.runs),
                    num_reserved_blocks=0, num_running=len(self.runs), num_waiting=0,
                    head_demand_blocks=0, waiting_demand_blocks=0, used_blocks_high=0,
                    num_running_high=0,
                    num_migrations_in=0, num_migrations_out=0, draining=False,
                    step_time_ewma_s=0.01, num_preemptions=0))))

    async def serve(self) -> None:
        while True:
            msg = wire.decode(await self.recv_from_peers.recv_multipart())
            if isinstance(msg, wire.Dispatch):
                self.num_received += 1
                body = wire.decode_body(msg)
                assert msg.mismatch(body) is None
                self.dispatches.append(body)
                self.runs[msg.req_id] = asyncio.get_running_loop().create_task(
                    self.run(msg, body))
            elif isinstance(msg, wire.Abort):
                self.aborts.append(msg.req_id)
                task = self.runs.pop(msg.req_id, None)
                if task is not None:
                    task.cancel()

    async def run(self, dispatch: wire.Dispatch, body: wire.DispatchBody) -> None:
        sock = self.push.get(dispatch.reply_addr)
        if sock is None:
            sock = self.push[dispatch.reply_addr] = self.ctx.socket(zmq.PUSH)
            sock.connect(dispatch.reply_addr)
        first = len(body.output_token_ids)
        end = body.sampling.max_tokens  # replayed outputs count towards max_tokens
        for index in range(first, end):
            await asyncio.sleep(self.token_delay_s)
            if not self.reporting:
                return  # dead
            await sock.send_multipart(wire.encode(wire.Tokens(
                req_id=dispatch.req_id, instance_id=self.instance_id, first_index=index,
                token_ids=(self.script[index % len(self.script)],),
                finish_reason="length" if index + 1 == end else None,
                attempt=dispatch.attempt)))
        self.runs.pop(dispatch.req_id, None)


@pytest.mark.e2e
def test_gateway_with_the_real_scheduler(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    port, admin_port = free_ports(2)
    config = gateway_config(model_dir, scheduler_addr=tcp(port), bypass_after_s=2.0)
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "ferry.services.scheduler", "--port", str(port), "--admin-port",
         str(admin_port), "--metrics-port", "0", "--view-interval-s", "0.2",
         "--heartbeat-timeout-s", "0.5",
         "--dispatch-policy", "round_robin", "--no-enable-migration"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "FERRY_LOG_LEVEL": "warning"},
        stderr=subprocess.PIPE, text=True)

    async def body():
        text = TextModel.load(model_dir)
        script = text.encode(SCRIPT_TEXT, add_special_tokens=False)
        ctx = zmq.asyncio.Context.instance()
        workers = [Worker(ctx, f"w{i}", config.scheduler_addr, script) for i in range(2)]
        gateway = Gateway(config, text)
        task = asyncio.get_running_loop().create_task(gateway.run())
        for worker in workers:
            worker.start()
        try:
            # healthy with no request yet: the gateway announced itself
            await wait_until(lambda: gateway.routes.num_instances == 2, timeout_s=15,
                             what="a view with both workers")
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{gateway.http.port}"
                async with session.get(base + "/health") as resp:
                    assert resp.status == 200
                async with session.post(base + "/v1/completions",
                                        json={"prompt": "hi", "max_tokens": 4}) as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
                    assert body["choices"][0]["text"] == text.decode(script[:4])
            async with AsyncClient(config.sdk.advertise) as client:
                outs = await asyncio.gather(*(client.generate("hi", max_tokens=6)
                                              for _ in range(8)))
                assert all(o.token_ids == tuple(script[:6]) for o in outs)
                # an abort travels gateway -> scheduler -> the holding worker
                for w in workers:
                    w.token_delay_s = 0.05
                stream = client.stream("hi", max_tokens=100)
                first = await stream.__anext__()
                await stream.aclose()
                await wait_until(lambda: any(first.req_id in w.aborts for w in workers),
                                 what="the Abort at the worker")
                # a worker dies mid-request: the gateway replays on the other one
                stream = client.stream("hi", max_tokens=30)
                chunks = [await stream.__anext__()]
                holder = next(w for w in workers if chunks[0].req_id in w.runs)
                holder.reporting = False
                chunks += [c async for c in stream]
                assert [t for c in chunks for t in c.token_ids] == [
                    script[i % len(script)] for i in range(30)]
                survivor = next(w for w in workers if w is not holder)
                replay = next(d for d in survivor.dispatches if d.req_id == chunks[0].req_id)
                assert 0 < len(replay.output_token_ids) < 30
                assert replay.sampling.max_tokens == 30
        finally:
            for worker in workers:
                worker.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        uvloop.run(asyncio.wait_for(body(), timeout=60))
    finally:
        scheduler.terminate()
        try:
            scheduler.wait(timeout=10)
        finally:
            scheduler.kill()
