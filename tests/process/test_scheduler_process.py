"""The scheduler process loop in-process (asyncio on uvloop) with fake workers, a fake
gateway and an admin client on plain ZMQ sockets; plus its command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import uvloop
import zmq
import zmq.asyncio

from ferry.common import wire
from ferry.common.config import Endpoint, SchedulerConfig
from ferry.common.sampling import SamplingParams
from ferry.common.wire import (
    Abort,
    AdminError,
    Dispatch,
    DispatchBody,
    InstanceDown,
    InstanceView,
    LoadReport,
    MigrateCommand,
    MigrateCommandReply,
    MigrateOut,
    MigrationDone,
    Placement,
    Priority,
    Register,
    Release,
    ReRegister,
    StatusReply,
    StatusRequest,
)
from ferry.common.zmq_util import request
from ferry.services.scheduler.entry import add_arguments, config_from_args
from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.main import Scheduler
from ferry.services.scheduler.provisioner import WorkerHandle, free_port

RECV_TIMEOUT_S = 3.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def bind_any(sock: zmq.asyncio.Socket) -> str:
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


async def recv_msg(
    sock: zmq.asyncio.Socket, skip: tuple[type, ...] = ()
) -> tuple[list[bytes], object]:
    while True:
        frames = await asyncio.wait_for(sock.recv_multipart(), RECV_TIMEOUT_S)
        msg = wire.decode(frames)
        if not isinstance(msg, skip):
            return frames, msg


async def nothing_more(
    sock: zmq.asyncio.Socket, wait_s: float = 0.2, skip: tuple[type, ...] = ()
) -> bool:
    with contextlib.suppress(TimeoutError):
        while True:
            frames = await asyncio.wait_for(sock.recv_multipart(), wait_s)
            if not isinstance(wire.decode(frames), skip):
                return False
    return True


class Peer:
    """A PULL inbox of its own and a PUSH to the scheduler's inbox."""

    def __init__(self, ctx: zmq.asyncio.Context, scheduler_addr: str) -> None:
        self.inbox = ctx.socket(zmq.PULL)
        self.addr = bind_any(self.inbox)
        self.to_scheduler = ctx.socket(zmq.PUSH)
        self.to_scheduler.setsockopt(zmq.LINGER, 0)
        self.to_scheduler.connect(scheduler_addr)

    async def send(self, msg: object) -> None:
        await self.to_scheduler.send_multipart(wire.encode(msg))

    async def expect(self, cls: type, skip: tuple[type, ...] = ()):
        frames, msg = await recv_msg(self.inbox, skip)
        assert isinstance(msg, cls), f"expected {cls.__name__}, got {msg!r}"
        return msg


class FakeWorker(Peer):
    def __init__(self, ctx, scheduler_addr, instance_id):
        super().__init__(ctx, scheduler_addr)
        self.instance_id = instance_id
        self.seq = 0
        self.num_dispatch_received = 0

    async def register(self, req_ids=()):
        await self.send(
            Register(
                instance_id=self.instance_id,
                inbox_addr=self.addr,
                num_blocks=100,
                block_size=16,
                max_model_len=4096,
                req_ids=tuple(req_ids),
            )
        )

    async def report(self, **fields):
        self.seq += 1
        await self.send(
            LoadReport(
                instance_id=self.instance_id,
                inbox_addr=self.addr,
                seq=self.seq,
                num_dispatch_received=self.num_dispatch_received,
                load=dataclasses.replace(empty_load(100), **fields),
            )
        )

    async def recv_dispatch(self) -> tuple[list[bytes], Dispatch]:
        frames, msg = await recv_msg(self.inbox)
        assert isinstance(msg, Dispatch), msg
        self.num_dispatch_received += 1
        return frames, msg

    async def keep_reporting(self, interval_s=0.05, **fields):
        while True:
            await self.report(**fields)
            await asyncio.sleep(interval_s)


class Cluster:
    def __init__(self, ctx: zmq.asyncio.Context, scheduler: Scheduler) -> None:
        self.ctx = ctx
        self.scheduler = scheduler
        self.gateway = Peer(ctx, scheduler.inbox_endpoint)
        self.admin_socket = ctx.socket(zmq.DEALER)
        self.admin_socket.setsockopt(zmq.LINGER, 0)
        self.admin_socket.connect(scheduler.admin_endpoint)

    def worker(self, instance_id: str) -> FakeWorker:
        return FakeWorker(self.ctx, self.scheduler.inbox_endpoint, instance_id)

    async def admin(self, msg: object):
        await self.admin_socket.send_multipart(wire.encode(msg))
        return (await recv_msg(self.admin_socket))[1]

    async def status(self) -> StatusReply:
        reply = await self.admin(StatusRequest())
        assert isinstance(reply, StatusReply)
        return reply

    async def until(self, predicate, timeout_s=RECV_TIMEOUT_S):
        """Poll status until predicate(status) holds (the inbox is processed asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"condition never held; last status {status}"
            await asyncio.sleep(0.02)

    def request(self, req_id, priority=Priority.NORMAL) -> Dispatch:
        return Dispatch.of(
            DispatchBody(req_id=req_id, attempt=0, prompt_token_ids=tuple(range(40)),
                         output_token_ids=(), sampling=SamplingParams(max_tokens=4, seed=7),
                         arrival_s=time.time()),
            priority=priority, reply_addr=self.gateway.addr)


def run_with_scheduler(scenario, *, provisioner=None, clock=time.monotonic, **cfg_fields):
    """Start a Scheduler on free ports, run scenario(cluster), stop everything."""
    any_port = Endpoint(bind="tcp://127.0.0.1:*", advertise="tcp://127.0.0.1:0")
    cfg_fields.setdefault("startup_grace_s", 0.0)  # views at once (the grace: test_scheduler_core)
    cfg = SchedulerConfig(inbox=any_port, admin=any_port, **cfg_fields)

    async def main():
        ctx = zmq.asyncio.Context()
        scheduler = Scheduler(cfg, ctx=ctx, provisioner=provisioner, clock=clock)
        loop_task = asyncio.create_task(scheduler.run())
        try:
            await scenario(Cluster(ctx, scheduler))
            assert scheduler.num_handler_errors == 0
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            scheduler.close()
            ctx.destroy(linger=0)

    uvloop.run(main())


def worker_ids(status: StatusReply, alive=True):
    return sorted(i.instance_id for i in status.instances if i.alive == alive)


# ---- scenarios --------------------------------------------------------------------------------


def test_dispatch_spreads_forwards_frames_unread_and_places():
    async def scenario(c: Cluster):
        workers = [c.worker(f"w{i}") for i in range(3)]
        for w in workers:
            await w.register()
        await c.until(lambda s: len(s.instances) == 3)
        sent = {}
        for n in range(9):
            req = c.request(f"r{n}")
            sent[req.req_id] = req
            await c.gateway.send(req)
        held = {}
        for w in workers:
            for _ in range(3):
                frames, req = await w.recv_dispatch()
                assert frames == wire.encode(sent[req.req_id])  # forwarded as sent
                held[req.req_id] = w.instance_id
            assert await nothing_more(w.inbox)
        placements = {}
        while len(placements) < 9:
            placement = await c.gateway.expect(Placement, skip=(InstanceView,))
            placements[placement.req_id] = placement.instance_id
        assert placements == held
        status = await c.status()
        assert {r.req_id: r.instance_id for r in status.requests} == held
        view = await c.gateway.expect(InstanceView)
        assert sorted(i.instance_id for i in view.instances) == ["w0", "w1", "w2"]

    run_with_scheduler(scenario, view_interval_s=0.1)


def test_a_dispatch_body_is_forwarded_unread():
    """The scheduler reads a Dispatch's header only: a body that is not even msgpack is
    placed by the header and forwarded byte for byte (its worker refuses it:
    test_worker_process)."""
    async def scenario(c: Cluster):
        worker = c.worker("w0")
        await worker.register()
        await c.until(lambda s: len(s.instances) == 1)
        req = dataclasses.replace(c.request("r0"), body=b"\xc1 not msgpack")
        await c.gateway.send(req)
        frames, forwarded = await worker.recv_dispatch()
        assert frames == wire.encode(req) and frames[2] == b"\xc1 not msgpack"
        placement = await c.gateway.expect(Placement, skip=(InstanceView,))
        assert (placement.req_id, placement.instance_id) == ("r0", "w0")

    run_with_scheduler(scenario)


def test_a_held_request_is_forwarded_once_a_report_shows_room():
    async def scenario(c: Cluster):
        worker = c.worker("w0")
        await worker.register()
        await worker.report(num_free_blocks=1, num_running=5)  # full
        await c.until(lambda s: s.instances and s.instances[0].load.num_free_blocks == 1)
        req = c.request("r0")
        await c.gateway.send(req)
        status = await c.until(lambda s: s.num_pending == 1)
        assert status.requests == ()  # held here, on no instance
        assert await nothing_more(worker.inbox)
        await worker.report(num_free_blocks=60, num_running=4)
        frames, forwarded = await worker.recv_dispatch()
        assert frames == wire.encode(req)
        placement = await c.gateway.expect(Placement, skip=(InstanceView,))
        assert (placement.req_id, placement.instance_id) == ("r0", "w0")
        assert (await c.status()).num_pending == 0

    run_with_scheduler(scenario, hold_until_room=True)


def test_no_instance_rejects_503():
    async def scenario(c: Cluster):
        await c.gateway.send(c.request("r0"))
        rejected = await c.gateway.expect(wire.DispatchRejected, skip=(InstanceView,))
        assert (rejected.req_id, rejected.code) == ("r0", 503)

    run_with_scheduler(scenario)


def test_release_aborts_on_the_holder():
    async def scenario(c: Cluster):
        w = c.worker("w0")
        await w.register()
        await c.until(lambda s: len(s.instances) == 1)
        await c.gateway.send(c.request("r0"))
        await c.gateway.send(c.request("r1"))
        await w.recv_dispatch()
        await w.recv_dispatch()
        await c.gateway.send(Release(req_id="r0", reason="finished"))
        await c.gateway.send(Release(req_id="r1", reason="timeout"))
        abort = await w.expect(Abort)
        assert (abort.req_id, abort.reason) == ("r1", "timeout")
        assert await nothing_more(w.inbox)
        await c.until(lambda s: s.requests == ())

    run_with_scheduler(scenario)


def test_silent_instance_is_declared_down_and_its_requests_dropped():
    async def scenario(c: Cluster):
        quiet, chatty = c.worker("quiet"), c.worker("chatty")
        await quiet.register()
        await chatty.register()
        reporting = asyncio.create_task(chatty.keep_reporting(num_free_blocks=100))
        try:
            await c.until(lambda s: len(s.instances) == 2)
            await c.gateway.send(c.request("r0"))
            await c.gateway.send(c.request("r1"))
            status = await c.until(lambda s: len(s.requests) == 2)
            assert "quiet" in [r.instance_id for r in status.requests]
            assert quiet.addr in c.scheduler.send_to_peers  # a Dispatch went there
            down = await c.gateway.expect(InstanceDown, skip=(Placement, InstanceView))
            assert down.instance_id == "quiet"
            status = await c.until(lambda s: worker_ids(s, alive=False) == ["quiet"])
            assert worker_ids(status) == ["chatty"]
            assert [r.instance_id for r in status.requests] == ["chatty"]
            # its PUSH socket (the Dispatch forwarded there) is closed; the live one's stays
            outboxes = c.scheduler.send_to_peers
            assert quiet.addr not in outboxes and chatty.addr in outboxes
        finally:
            reporting.cancel()

    run_with_scheduler(scenario, heartbeat_timeout_s=0.4)


def test_unknown_instance_is_asked_to_register_again():
    async def scenario(c: Cluster):
        w = c.worker("w0")
        await w.report(num_free_blocks=60, num_running=2)  # as after a scheduler restart
        rereg = await w.expect(ReRegister)
        status = await c.status()
        assert rereg.scheduler_epoch == status.scheduler_epoch
        await w.register(req_ids=("old-1", "old-2"))
        status = await c.until(lambda s: len(s.requests) == 2)
        assert {(r.req_id, r.instance_id) for r in status.requests} == {
            ("old-1", "w0"),
            ("old-2", "w0"),
        }
        await w.report(num_free_blocks=60, num_running=2)
        assert await nothing_more(w.inbox)

    run_with_scheduler(scenario)


def test_migrate_command_round_trip():
    async def scenario(c: Cluster):
        a, b = c.worker("a"), c.worker("b")
        await a.register()
        await b.register()
        await c.until(lambda s: len(s.instances) == 2)
        await c.gateway.send(c.request("r0"))
        await a.recv_dispatch()  # round_robin: "a" first

        await c.admin_socket.send_multipart(
            wire.encode(MigrateCommand(req_id="r0", dst_instance_id="b", timeout_s=3.0))
        )
        order = await a.expect(MigrateOut)
        assert (order.req_id, order.dst_instance_id, order.dst_inbox_addr) == ("r0", "b", b.addr)
        outcome = MigrationDone(
            migration_id=order.migration_id,
            req_id="r0",
            src_instance_id="a",
            dst_instance_id="b",
            committed=True,
            reason="",
            num_stages=3,
            num_blocks=3,
            num_bytes=3 << 20,
            total_s=0.05,
            downtime_s=0.004,
        )
        await a.send(outcome)
        _, reply = await recv_msg(c.admin_socket)
        assert reply == MigrateCommandReply(ok=True, reason="", done=outcome)
        await c.gateway.expect(Placement, skip=(InstanceView,))  # the dispatch's
        moved = await c.gateway.expect(Placement, skip=(InstanceView,))
        assert (moved.req_id, moved.instance_id) == ("r0", "b")
        status = await c.status()
        assert [(r.req_id, r.instance_id) for r in status.requests] == [("r0", "b")]
        assert (status.num_migrations_committed, status.num_migrations_aborted) == (1, 0)

        unknown = await c.admin(MigrateCommand(req_id="nope", dst_instance_id="a", timeout_s=1.0))
        assert isinstance(unknown, AdminError) and unknown.code == 404
        timed_out = await c.admin(MigrateCommand(req_id="r0", dst_instance_id="a", timeout_s=0.2))
        assert (
            isinstance(timed_out, MigrateCommandReply)
            and not timed_out.ok
            and "0.2s" in timed_out.reason
        )
        bad = await c.admin(MigrateCommand(req_id="r0", dst_instance_id="a", timeout_s=-1.0))
        assert isinstance(bad, AdminError) and bad.code == 400

    run_with_scheduler(scenario, dispatch_policy="round_robin", enable_migration=False)


def test_pairing_sends_migrate_out_to_the_overloaded_instance():
    async def scenario(c: Cluster):
        hot, cold = c.worker("hot"), c.worker("cold")
        await hot.register()
        await cold.register()
        await hot.report(num_free_blocks=2, num_running=10)
        await cold.report(num_free_blocks=95, num_running=1)
        order = await hot.expect(MigrateOut)
        assert (order.dst_instance_id, order.dst_inbox_addr, order.req_id) == (
            "cold",
            cold.addr,
            None,
        )
        await hot.send(
            MigrationDone(
                migration_id=order.migration_id,
                req_id="x",
                src_instance_id="hot",
                dst_instance_id="cold",
                committed=False,
                reason="no request to move",
                num_stages=0,
                num_blocks=0,
                num_bytes=0,
                total_s=0.0,
                downtime_s=0.0,
            )
        )
        status = await c.until(lambda s: s.num_migrations_aborted >= 1)
        assert "no request to move" in status.abort_reasons

    run_with_scheduler(scenario, migration_interval_s=0.05, heartbeat_timeout_s=5.0)


def test_malformed_frames_are_counted_and_the_loop_goes_on():
    async def scenario(c: Cluster):
        raw = c.gateway.to_scheduler
        await raw.send_multipart([b"garbage"])  # one frame
        header = wire.encode(c.request("x"))[0]
        await raw.send_multipart([header, b"\xc1\xc1", b""])  # a Dispatch, bad msgpack
        await raw.send_multipart(wire.encode(StatusRequest()))  # not accepted on the inbox
        await c.admin_socket.send_multipart([b"junk", b"junk"])
        _, error = await recv_msg(c.admin_socket)
        assert isinstance(error, AdminError) and error.code == 400
        await c.admin_socket.send_multipart(wire.encode(Release(req_id="x", reason="abort")))
        _, error = await recv_msg(c.admin_socket)
        assert isinstance(error, AdminError) and "not accepted" in error.message
        w = c.worker("w0")
        await w.register()
        await c.until(lambda s: len(s.instances) == 1)
        assert c.scheduler.recv_from_peers.num_rejected == 3
        assert c.scheduler.num_admin_rejected == 2

    run_with_scheduler(scenario)


def test_a_failing_admin_handler_answers_500_and_the_loop_goes_on():
    async def scenario(c: Cluster):
        def broken(now):
            raise RuntimeError("bug")

        c.scheduler.core.status = broken
        error = await c.admin(StatusRequest())
        assert isinstance(error, AdminError) and error.code == 500
        assert c.scheduler.num_handler_errors == 1
        del c.scheduler.core.status  # back to the class's method
        c.scheduler.num_handler_errors = 0
        assert isinstance(await c.admin(StatusRequest()), StatusReply)

    run_with_scheduler(scenario)


# ---- command line ---------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_every_config_field_has_a_flag():
    non_defaults = {
        "dispatch_policy": "least_load",
        "heartbeat_timeout_s": 3.5,
        "view_interval_s": 0.5,
        "startup_grace_s": 0.25,
        "gateway_timeout_s": 7.5,
        "enable_migration": False,
        "migration_interval_s": 0.7,
        "migrate_out_threshold": 2.5,
        "migrate_dst_growth_blocks": 7,
        "max_migrations_per_instance": 5,
        "high_priority_headroom_blocks": 12,
        "migrate_margin": 1.5,
        "max_queued_per_instance": 9,
        "autoscale": True,
        "min_workers": 2,
        "max_workers": 6,
        "scale_up_freeness": 3.0,
        "scale_down_freeness": 90.0,
        "scale_cooldown_s": 4.0,
        "prefix_pull": False,
        "kv_bandwidth_bytes_s": 5e10,
        "hold_until_room": False,
        "max_pending": 99,
        "pending_window": 8,
        "pending_max_wait_s": 2.5,
        "max_frame_bytes": 12345,
        "keys_dir": "/etc/ferry/keys",
        "key_name": "scheduler-a",
    }
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)} - {"inbox", "admin"}
    assert set(non_defaults) == fields, "a SchedulerConfig field has no flag test"
    argv = ["--port", "7001", "--admin-port", "7002"]
    for name, value in non_defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    cfg = config_from_args(parse(argv))
    assert {name: getattr(cfg, name) for name in non_defaults} == non_defaults
    assert cfg.inbox.bind.endswith(":7001") and cfg.admin.bind.endswith(":7002")


def test_defaults_match_the_config():
    cfg = config_from_args(parse([]))
    defaults = SchedulerConfig(inbox=cfg.inbox, admin=cfg.admin)
    assert cfg == defaults


def test_the_module_runs_answers_status_and_metrics_and_stops_on_sigterm():
    port = free_port()
    admin_port = free_port()
    metrics_port = free_port()
    while len({port, admin_port, metrics_port}) < 3:
        admin_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FERRY_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ferry.services.scheduler",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
    )
    try:

        async def ask():
            ctx = zmq.asyncio.Context()
            try:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        return await request(
                            ctx,
                            f"tcp://127.0.0.1:{admin_port}",
                            StatusRequest(),
                            timeout_s=1.0,
                            expected=(StatusReply,),
                        )
                    except TimeoutError:
                        assert time.monotonic() < deadline and proc.poll() is None
            finally:
                ctx.destroy(linger=0)

        reply = asyncio.run(ask())
        assert reply.dispatch_policy == "llumnix" and reply.instances == ()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "ferry:migrations_committed_total 0.0" in text
        assert "ferry:pending_requests 0.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "llumnix"])
def test_a_burst_without_reports_still_spreads(policy):
    """The classic bug: with no report between dispatches, everything lands on one instance."""

    async def scenario(c: Cluster):
        workers = [c.worker(f"w{i}") for i in range(4)]
        for w in workers:
            await w.register()
            await w.report(num_free_blocks=100)
        await c.until(lambda s: len(s.instances) == 4)
        for n in range(40):
            await c.gateway.send(c.request(f"r{n}"))
        status = await c.until(lambda s: len(s.requests) == 40)
        per_instance = {
            i: sum(r.instance_id == i for r in status.requests) for i in worker_ids(status)
        }
        assert per_instance == {f"w{i}": 10 for i in range(4)}

    run_with_scheduler(scenario, dispatch_policy=policy)


class FakeProvisioner:
    def __init__(self):
        self.procs = {}
        self.stopped = []

    def start_worker(self):
        instance_id = f"auto-{len(self.procs) + len(self.stopped)}"
        self.procs[instance_id] = None
        return WorkerHandle(instance_id=instance_id, pid=0)

    def stop_worker(self, instance_id, *, now=None):
        self.stopped.append(instance_id)
        del self.procs[instance_id]
        return True

    def reap(self, now=None):
        return []

    def close(self):
        pass


def test_autoscale_starts_drains_and_stops_workers(monkeypatch):
    monkeypatch.setattr("ferry.services.scheduler.main.AUTOSCALE_INTERVAL_S", 3600.0)  # ticks driven here
    provisioner = FakeProvisioner()
    now = [0.0]

    async def scenario(c: Cluster):
        def tick(t):
            now[0] = t
            c.scheduler.autoscale()

        tick(0.0)  # below min_workers: one start at once
        assert list(provisioner.procs) == ["auto-0"]
        base, auto0 = c.worker("base"), c.worker("auto-0")
        for w in (base, auto0):
            await w.register()
            await w.report(num_free_blocks=10, num_running=10)  # F = 1: below the band
        await c.until(
            lambda s: len(s.instances) == 2 and all(i.load.num_running for i in s.instances)
        )
        tick(1.0)  # auto-0 registered: cooldown starts over
        tick(10.0)
        assert list(provisioner.procs) == ["auto-0"]
        tick(11.0)
        assert list(provisioner.procs) == ["auto-0", "auto-1"]
        auto1 = c.worker("auto-1")
        for w in (base, auto0, auto1):
            await w.register()
            await w.report(num_free_blocks=100)  # idle: above the band
        await c.until(
            lambda s: len(s.instances) == 3 and not any(i.load.num_running for i in s.instances)
        )
        tick(12.0)
        tick(22.0)
        await auto0.expect(wire.SetDraining)  # fewest requests, lowest id, and removable
        assert await nothing_more(base.inbox)
        await auto0.report(num_free_blocks=100, draining=True)
        await c.until(lambda s: any(i.load.draining for i in s.instances))
        tick(23.0)
        assert provisioner.stopped == ["auto-0"]
        status = await c.status()
        assert worker_ids(status) == ["auto-1", "base"]

    run_with_scheduler(
        scenario,
        provisioner=provisioner,
        clock=lambda: now[0],
        autoscale=True,
        min_workers=1,
        max_workers=3,
        scale_cooldown_s=10.0,
        heartbeat_timeout_s=1000.0,
        enable_migration=False,
    )
