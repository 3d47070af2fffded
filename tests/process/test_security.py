"""Trust on the internal sockets (common/security.py): keys, the sender allow-lists, and
each attack an operator found possible on a keyless cluster, refused once it has keys:
registering a fake worker, reading request ids or draining from the admin port,
dispatching or aborting as someone else, injecting tokens into a stream, reserving a
worker's KV with a bogus migration, a worker speaking for another instance."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from pathlib import Path

import pytest
import uvloop
import zmq
import zmq.asyncio

from ferry.common import security, wire
from ferry.common.config import Endpoint, SchedulerConfig, WorkerConfig
from ferry.common.security import (
    KEYLESS,
    KeysError,
    Sender,
    add_identity,
    check_role,
    init_keys,
    load_keys,
    refusal,
)
from ferry.common.zmq_util import make_context, request
from ferry.services.scheduler.main import INBOX_SENDERS, Scheduler
from ferry.services.worker.main import Worker
from tests.e2e.test_gateway_harness import free_ports, tcp, wait_until
from tests.process.test_worker_process import dispatch, sim_engine

IDENTITIES = [("scheduler", "scheduler", ""), ("gateway", "gateway", ""),
              ("worker", "worker", ""), ("admin", "admin", ""),
              ("w1", "worker", "w1")]


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys") / "k"
    init_keys(root, IDENTITIES)
    return root


# ---- keys and the allow-list (pure) ---------------------------------------------------------


def test_keys_load_by_identity_with_their_role(keys_dir):
    w1 = load_keys(str(keys_dir), "w1")
    assert w1.own == Sender(role="worker", name="w1", instance_id="w1")
    assert {s.name for s in w1.peers.values()} == {n for n, _, _ in IDENTITIES}
    check_role(w1, "worker")
    with pytest.raises(KeysError, match="is a worker key; this process is a gateway"):
        check_role(w1, "gateway")
    with pytest.raises(KeysError, match="no key .*nobody.key_secret"):
        load_keys(str(keys_dir), "nobody")
    assert load_keys("", "worker") is None  # keyless
    assert oct(os.stat(keys_dir / "w1.key_secret").st_mode & 0o777) == "0o600"
    with pytest.raises(KeysError, match="exists already"):
        add_identity(keys_dir, "w1", "worker")
    with pytest.raises(KeysError, match="has keys already"):
        init_keys(keys_dir, [])


def test_the_allow_list_checks_role_and_the_instance_a_key_speaks_for():
    register = wire.Register(instance_id="w0", inbox_addr="tcp://w0:1", num_blocks=1,
                             block_size=16, max_model_len=64, req_ids=())
    worker = Sender(role="worker", name="worker")
    assert refusal(register, worker, INBOX_SENDERS) is None
    assert "only worker" in refusal(register, Sender(role="gateway", name="gateway"),
                                    INBOX_SENDERS)
    assert "an unknown sender" in refusal(register, KEYLESS, INBOX_SENDERS)
    w1 = Sender(role="worker", name="w1", instance_id="w1")
    assert "claims instance_id='w0'" in refusal(register, w1, INBOX_SENDERS)
    assert Sender.from_user_id(w1.user_id) == w1
    assert Sender.from_user_id("root:x:") == Sender(role="", name="x")  # no such role


# ---- the scheduler --------------------------------------------------------------------------


def keyed_socket(ctx, kind, addr, keys_dir=None, name=None):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if name is not None:
        load_keys(str(keys_dir), name).client(sock)
    sock.connect(addr)
    return sock


async def send_keyless(sock, msg) -> None:
    """Send from a socket with no key. Its CURVE handshake fails, and once it has the
    socket has no peer and a send would wait forever: not queuing it is a refusal too."""
    with contextlib.suppress(zmq.Again):
        await sock.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK)


def register_msg(instance_id: str, port: int) -> wire.Register:
    return wire.Register(instance_id=instance_id, inbox_addr=tcp(port), num_blocks=64,
                         block_size=16, max_model_len=256, req_ids=())


def test_the_scheduler_hears_only_keyed_senders_in_their_roles(keys_dir):
    cfg = SchedulerConfig(inbox=Endpoint(bind="tcp://127.0.0.1:*", advertise="tcp://x:1"),
                          admin=Endpoint(bind="tcp://127.0.0.1:*", advertise="tcp://x:2"),
                          startup_grace_s=0.0, heartbeat_timeout_s=30.0,
                          keys_dir=str(keys_dir))

    async def main():
        ctx = zmq.asyncio.Context()
        scheduler = Scheduler(cfg, ctx=ctx)
        task = asyncio.create_task(scheduler.run())
        inbox, admin = scheduler.inbox_endpoint, scheduler.admin_endpoint
        sockets = []

        def push(name):
            sockets.append(keyed_socket(ctx, zmq.PUSH, inbox, keys_dir, name))
            return sockets[-1]

        async def status(name="admin"):
            keys = None if name is None else load_keys(str(keys_dir), name)
            return await request(ctx, admin, wire.StatusRequest(), timeout_s=1.0,
                                 expected=(wire.StatusReply, wire.AdminError), keys=keys)

        try:
            ports = free_ports(4)
            # a fake worker with no key, one with a gateway key, one with w1's key
            # claiming w0: none is registered
            await send_keyless(push(None), register_msg("fake", ports[0]))
            await push("gateway").send_multipart(wire.encode(register_msg("gw", ports[1])))
            await push("w1").send_multipart(wire.encode(register_msg("w0", ports[2])))
            # the real ones are
            await push("w1").send_multipart(wire.encode(register_msg("w1", ports[3])))
            await wait_until(lambda: scheduler.core.table.get("w1") is not None)
            # a request is placed by a gateway; a worker key can neither dispatch nor
            # release (abort) someone's request, nor announce a gateway
            gateway = ctx.socket(zmq.PULL)
            gateway_addr = tcp(free_ports(1)[0])
            gateway.bind(gateway_addr)
            sockets.append(gateway)
            victim = wire.Dispatch.of(wire.DispatchBody(
                req_id="victim-0", attempt=0, prompt_token_ids=(1, 2, 3), output_token_ids=(),
                sampling=wire.SamplingParams(max_tokens=4), arrival_s=0.0),
                priority=0, reply_addr=gateway_addr)
            await push("gateway").send_multipart(wire.encode(victim))
            await wait_until(lambda: "victim-0" in scheduler.core.reqs)
            for name, msg in (("worker", wire.Release(req_id="victim-0", reason="abort")),
                              ("worker", dataclasses.replace(victim, req_id="evil-0")),
                              ("worker", wire.GatewayHello(gateway_id="evil",
                                                           inbox_addr="tcp://evil:1",
                                                           req_id_prefix="evil-"))):
                await push(name).send_multipart(wire.encode(msg))
            await asyncio.sleep(0.3)
            assert "victim-0" in scheduler.core.reqs and "evil-0" not in scheduler.core.reqs
            assert "tcp://evil:1" not in scheduler.core.gateways
            assert [i.instance_id for i in scheduler.core.table] == ["w1"]
            assert scheduler.recv_from_peers.num_refused == 2 + 3  # keyless never got through
            # the admin port: no key -> no answer at all; a worker key -> 403; admin -> ok
            with pytest.raises(TimeoutError):
                await status(None)
            refused = await status("worker")
            assert isinstance(refused, wire.AdminError) and refused.code == 403
            drain = await request(ctx, admin, wire.DrainCommand(instance_id="w1", timeout_s=1),
                                  timeout_s=1.0, expected=(wire.DrainReply, wire.AdminError),
                                  keys=load_keys(str(keys_dir), "gateway"))
            assert isinstance(drain, wire.AdminError) and drain.code == 403
            assert not scheduler.core.table.get("w1").draining
            reply = await status()
            assert [i.instance_id for i in reply.instances] == ["w1"]
        finally:
            for sock in sockets:
                sock.close(linger=0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            scheduler.close()
            security.stop(ctx)
            ctx.destroy(linger=0)

    uvloop.run(asyncio.wait_for(main(), 30))


# ---- a worker -------------------------------------------------------------------------------


def test_a_worker_takes_steering_only_from_the_scheduler_and_kv_only_from_workers(keys_dir):
    async def main():
        port, gateway_port = free_ports(2)
        addr = tcp(port)
        config = WorkerConfig(instance_id="w1", inbox=Endpoint(bind=addr, advertise=addr),
                              scheduler_addr=tcp(free_ports(1)[0]), model="tiny",
                              executor="sim", keys_dir=str(keys_dir), key_name="w1")
        worker = Worker(config, sim_engine())
        task = asyncio.get_running_loop().create_task(worker.run())
        ctx = make_context()
        gateway_inbox = ctx.socket(zmq.PULL)
        load_keys(str(keys_dir), "gateway").server(gateway_inbox)  # (keys: any server)
        gateway_inbox.bind(tcp(gateway_port))

        class Peers:
            gateway_addr = tcp(gateway_port)

        sockets = {name: keyed_socket(ctx, zmq.PUSH, addr, keys_dir, name)
                   for name in ("scheduler", "gateway", "worker")}
        sockets["nokey"] = keyed_socket(ctx, zmq.PUSH, addr)
        try:
            await sockets["gateway"].send_multipart(wire.encode(dispatch(Peers, "r0")))
            await wait_until(lambda: worker.engine.get("r0") is not None)
            # drain it, reserve its KV, abort a request: from the wrong role or no key
            bogus = wire.MigPrealloc(
                migration_id="m", req_id="x", src_instance_id="evil",
                src_inbox_addr="tcp://evil:1", num_blocks=200, kv_block_bytes=1, group_id=None,
                prompt_token_ids=(1,))
            for name, msg in (("worker", wire.SetDraining(draining=True)),
                              ("gateway", wire.SetDraining(draining=True)),
                              ("gateway", bogus), ("scheduler", bogus),
                              ("nokey", wire.Abort(req_id="r0", reason="x")),
                              ("nokey", wire.SetDraining(draining=True))):
                if name == "nokey":
                    await send_keyless(sockets[name], msg)
                else:
                    await sockets[name].send_multipart(wire.encode(msg))
            await wait_until(lambda: worker.recv_from_peers.num_refused == 4)
            await asyncio.sleep(0.2)
            assert not worker.draining and worker.engine.blocks.num_reserved == 0
            assert worker.engine.get("r0") is not None
            await sockets["scheduler"].send_multipart(wire.encode(
                wire.SetDraining(draining=True)))
            await wait_until(lambda: worker.draining)
        finally:
            for sock in [*sockets.values(), gateway_inbox]:
                sock.close(linger=0)
            worker.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_keys_on_the_command_line_of_every_service():
    """`ferry keys` makes what the services load (`init`, `add`, `list`)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "keys"

        def keys(*args):
            return subprocess.run([sys.executable, "-m", "ferry.services.cli", "keys", *args],
                                  capture_output=True, text=True, timeout=60)

        out = keys("init", str(root), "--workers", "worker-0")
        assert out.returncode == 0, out.stderr
        assert keys("init", str(root), "--if-missing").returncode == 0
        assert keys("init", str(root)).returncode == 2  # never overwrites
        assert keys("add", str(root), "gw-2", "--role", "gateway").returncode == 0
        listed = keys("list", str(root)).stdout
        assert "worker-0" in listed and "speaks for worker-0 only" in listed
        assert "gw-2" in listed and "gateway" in listed
        check_role(load_keys(str(root), "gw-2"), "gateway")


def test_the_kv_store_listens_on_the_configured_interface_only():
    import torch

    from ferry.services.worker.migration.kv_transfer import KVTransport

    kv = KVTransport(torch.zeros(4, 8), instance_id="w0", advertise_host="127.0.0.1",
                     chunk_bytes=1024, timeout_s=5.0, bind_host="127.0.0.1")
    group_id, store_addr = kv.open_receiving("w9", None)
    try:
        port = int(store_addr.rsplit(":", 1)[1])
        listening = {line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A"}  # state LISTEN
        assert f"0100007F:{port:04X}" in listening  # 127.0.0.1 only, not 0.0.0.0
        assert f"00000000:{port:04X}" not in listening
        assert len(group_id.rsplit("-", 1)[1]) == 32  # the 128-bit secret in the key prefix
    finally:
        kv.close()
        time.sleep(0.1)


def test_tokens_reach_a_gateway_only_from_a_worker_speaking_for_itself(keys_dir):
    """Injecting text into another user's stream: refused unless the sender is a worker,
    and a worker key bound to an instance may not claim another one."""
    from ferry.common.zmq_util import Inbox
    from ferry.services.gateway.main import CLUSTER_SENDERS

    def tokens(instance_id):
        return wire.Tokens(req_id="victim-0", instance_id=instance_id, first_index=0,
                           token_ids=(1, 2, 3), finish_reason=None)

    async def main():
        ctx = zmq.asyncio.Context()
        keys = security.for_process(ctx, str(keys_dir), "gateway", "gateway")
        addr = tcp(free_ports(1)[0])
        inbox = Inbox(ctx, addr, allowed=CLUSTER_SENDERS, max_frame_bytes=2**20, keys=keys)
        senders = {name: keyed_socket(ctx, zmq.PUSH, addr, keys_dir, name)
                   for name in ("scheduler", "w1", "worker")}
        senders["nokey"] = keyed_socket(ctx, zmq.PUSH, addr)
        try:
            for name, msg in (("nokey", tokens("w1")), ("scheduler", tokens("w1")),
                              ("w1", tokens("w0")), ("w1", tokens("w1")),
                              ("worker", tokens("w7"))):
                if name == "nokey":
                    await send_keyless(senders[name], msg)
                else:
                    await senders[name].send_multipart(wire.encode(msg))
            got = [await asyncio.wait_for(inbox.recv(), 5) for _ in range(2)]
            assert sorted(m.instance_id for m in got) == ["w1", "w7"]  # shared key: any instance
            assert inbox.num_refused == 2
        finally:
            for sock in senders.values():
                sock.close(linger=0)
            inbox.close()
            security.stop(ctx)
            ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(main(), 30))
