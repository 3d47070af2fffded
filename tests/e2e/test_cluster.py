"""The whole system as users run it: `ferry up` with 2 tiny-model CPU workers, then
requests through the SDK, HTTP and the official openai client, aborts, bad input on every
socket, live migrations between the workers, and a clean stop."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import zmq

from ferry.bench.local_cluster import Cluster, pid_alive, start_cluster
from ferry.common import wire
from ferry.common.codec import HEADER, PROTOCOL_VERSION
from ferry.common.zmq_util import make_context, request

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    tmp = tmp_path_factory.mktemp("cluster")
    models = tmp_path_factory.getbasetemp() / "models"
    c = start_cluster(tmp, workers=2, model_cache=str(models),
                      extra=("--worker-arg=--num-blocks=1024",))
    yield c
    pids = c.ready["pids"]
    c.stop()
    # Stopping `ferry up` leaves no process behind.
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, p in pids.items() if pid_alive(p)], c.logs()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_concurrent_sdk_and_http_requests_get_exactly_max_tokens_in_order(cluster):
    from openai import AsyncOpenAI

    from ferry import AsyncClient

    async def sdk_stream(client, i):
        max_tokens = 20 + 7 * i
        indices, tokens = [], []
        async for chunk in client.stream(prompt_token_ids=list(range(30, 40 + i)),
                                         max_tokens=max_tokens, ignore_eos=True, temperature=0.7,
                                         seed=i):
            indices.append(chunk.first_index)
            assert chunk.first_index == len(tokens), "chunks in order, no gap"
            tokens.extend(chunk.token_ids)
        assert len(tokens) == max_tokens

    async def openai_call(oai, i, stream):
        max_tokens = 15 + 5 * i
        if stream:
            chunks = await oai.completions.create(model="tiny", prompt=f"stream number {i}",
                                                  max_tokens=max_tokens, stream=True,
                                                  extra_body={"ignore_eos": True})
            finish = [c.choices[0].finish_reason async for c in chunks]
            assert finish[-1] == "length"
        else:
            resp = await oai.completions.create(model="tiny", prompt=f"number {i}",
                                                max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True})
            assert resp.usage.completion_tokens == max_tokens
            assert resp.choices[0].finish_reason == "length"

    async def body():
        oai = AsyncOpenAI(base_url=cluster.base_url + "/v1", api_key="unused")
        async with AsyncClient(cluster.sdk_addr) as client:
            await asyncio.gather(*[sdk_stream(client, i) for i in range(8)],
                                 *[openai_call(oai, i, i % 2 == 0) for i in range(6)])
            out = await client.generate("plain", max_tokens=9, ignore_eos=True)
            assert len(out.token_ids) == 9 and out.finish_reason == "length"
        await oai.close()

    run(body())
    status = cluster.wait_idle()
    # dispatch spread the work over both instances
    assert all(i["alive"] for i in status["instances"]) and len(status["instances"]) == 2


def test_aborts_and_disconnects_free_every_block(cluster):
    import aiohttp

    from ferry import AsyncClient

    async def body():
        async with AsyncClient(cluster.sdk_addr) as client:
            streams = [client.stream(prompt_token_ids=list(range(50, 90)), max_tokens=2000,
                                     ignore_eos=True) for _ in range(4)]
            for s in streams:
                await s.__anext__()
            for s in streams:
                await s.aclose()  # SDK abort
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "disconnect me", "max_tokens": 3000, "ignore_eos": True}
            resp = await session.post(cluster.base_url + "/v1/completions",
                                      json={**body, "stream": True})
            assert resp.status == 200
            await resp.content.readline()  # streaming has begun
            resp.close()  # the client goes away mid-stream
            task = asyncio.create_task(session.post(cluster.base_url + "/v1/completions",
                                                    json=body))
            await asyncio.sleep(0.5)
            task.cancel()  # a non-streaming client goes away before its answer
            with pytest.raises(asyncio.CancelledError):
                await task

    run(body())
    status = cluster.wait_idle(timeout_s=30)
    assert not status["requests"]


def _junk_frames() -> list[list[bytes]]:
    header = wire.encode(wire.Abort(req_id="r", reason="x"))[0]
    return [
        [b"not-a-header", b"x"],
        [HEADER.pack(PROTOCOL_VERSION, 9999), msgpack.packb([])],  # unknown tag
        [HEADER.pack(PROTOCOL_VERSION + 1, 50), msgpack.packb(["r", "x"])],  # other version
        [header, b"\xc1\xc1\xc1"],  # malformed msgpack
        [header, msgpack.packb([1, 2])],  # wrong field types
        [header, b"\x00" * (20 * 1024 * 1024)],  # over the frame limit
        [b"one frame only"],
    ]


def test_bad_input_on_every_socket_keeps_serving(cluster):
    from ferry import Client

    ctx = zmq.Context()
    base = int(cluster.admin_addr.rsplit(":", 1)[1]) - 1
    pulls = [f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 2}",  # scheduler, gateway
             f"tcp://127.0.0.1:{base + 100}", f"tcp://127.0.0.1:{base + 101}"]  # workers
    for addr in pulls:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(addr)
        for frames in _junk_frames():
            sock.send_multipart(frames)
        sock.close()
    for addr in (cluster.sdk_addr, cluster.admin_addr):  # ROUTERs answer with an error
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(addr)
        for frames in _junk_frames()[:5]:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"{addr} did not answer bad input"
            reply = wire.decode(sock.recv_multipart())
            assert isinstance(reply, wire.ErrorReply | wire.AdminError)
            assert reply.code in (400, 413, 426)
        sock.close()
    ctx.term()
    time.sleep(0.5)
    with Client(cluster.sdk_addr) as client:  # everything still serves
        assert len(client.generate("still here", max_tokens=5, ignore_eos=True).token_ids) == 5
    status = cluster.wait_idle()
    assert all(i["alive"] for i in status["instances"])


def test_invalid_http_bodies_answer_clearly_and_leak_nothing(cluster):
    import httpx

    url = cluster.base_url + "/v1/completions"
    cases = [
        ({"prompt": "x", "max_tokens": -3}, 400),
        ({"prompt": "x", "max_tokens": 10**9}, 400),
        ({"prompt": "word " * 5000, "max_tokens": 10}, 400),  # longer than the context
        ({"prompt": 42, "max_tokens": 5}, 400),
        ({"prompt": "x", "max_tokens": "five"}, 400),
    ]
    with httpx.Client(timeout=30) as http:
        for body, code in cases:
            resp = http.post(url, json=body)
            assert resp.status_code == code, (body, resp.text)
            assert resp.json()["error"]["message"]
        resp = http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 400
        resp = http.post(url, json={"prompt": "fine", "max_tokens": 4, "ignore_eos": True})
        assert resp.status_code == 200
    cluster.wait_idle()


def _other(instance_id: str) -> str:
    return "worker-1" if instance_id == "worker-0" else "worker-0"


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, seed=1234)],
                         ids=["greedy", "seeded"])
def test_migrated_mid_decode_back_and_forth_same_tokens_unbroken_stream(cluster, sampling):
    from ferry import AsyncClient

    prompt = list(range(100, 260))
    # Long enough that it is still running on the server while the test, reading chunks
    # that may sit buffered in the client, asks for four migrations.
    kwargs = dict(prompt_token_ids=prompt, max_tokens=1500, ignore_eos=True, **sampling)

    async def holder_of(req_id: str) -> str:
        reply = await request(make_context(), cluster.admin_addr, wire.StatusRequest(),
                              timeout_s=5, expected=(wire.StatusReply,))
        holders = [r.instance_id for r in reply.requests if r.req_id == req_id]
        assert holders, f"{req_id} is no longer running: make max_tokens larger"
        return holders[0]

    async def body():
        async with AsyncClient(cluster.sdk_addr) as client:
            reference = await client.generate(**kwargs)
            tokens, num_migrations = [], 0
            stream = client.stream(**kwargs)
            async for chunk in stream:
                assert chunk.first_index == len(tokens), "one unbroken stream"
                tokens.extend(chunk.token_ids)
                if len(tokens) >= 40 * (num_migrations + 1) and num_migrations < 4:
                    holder = await holder_of(chunk.req_id)
                    out = await asyncio.to_thread(cluster.cli, "migrate", chunk.req_id, "--to",
                                                  _other(holder), "--json")
                    assert out.returncode == 0, out.stderr + cluster.logs()
                    num_migrations += 1
            assert num_migrations == 4
            assert tokens == list(reference.token_ids)

    before = cluster.status()["migrations"]["committed"]
    run(body())
    assert cluster.status()["migrations"]["committed"] == before + 4
    cluster.wait_idle()


def test_migrate_unknown_request_fails_with_reason(cluster):
    out = cluster.cli("migrate", "no-such-request", "--to", "worker-0")
    assert out.returncode != 0 and "unknown request" in out.stderr
