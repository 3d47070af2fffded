"""The SDK against a real gateway (in-process) and a fake scheduler + workers: generate,
stream, abort, timeouts, typed errors, bad frames, 429, replay, bypass mode."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import msgpack
import pytest
import uvloop
import zmq
import zmq.asyncio

from ferry import (
    AsyncClient,
    BadRequest,
    Client,
    Overloaded,
    Timeout,
    Unauthorized,
    Unavailable,
)
from ferry.common import wire
from ferry.common.codec import HEADER, PROTOCOL_VERSION
from ferry.common.sampling import SamplingParams
from tests.e2e.test_gateway_harness import (
    ThreadedHarness,
    fake_logprobs,
    free_ports,
    running,
    tcp,
    wait_until,
)
from tests.unit.test_gateway_text import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def arun(coro):
    return uvloop.run(asyncio.wait_for(coro, timeout=30))


def expected(h, n: int) -> list[int]:
    script = h.cluster.script
    return [script[i % len(script)] for i in range(n)]


# ---- generate / stream --------------------------------------------------------------------


def test_generate_returns_the_completion_and_releases(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            out = await client.generate("hello world", max_tokens=7, temperature=0.5, seed=None)
            assert out.token_ids == tuple(expected(h, 7))
            assert out.text == h.gateway.text.decode(out.token_ids)
            assert out.finish_reason == "length"
            assert out.num_prompt_tokens == len(h.gateway.text.encode("hello world"))
            dispatch = h.cluster.dispatches[0]
            assert out.req_id == dispatch.req_id and out.req_id.startswith("gw-")
            assert dispatch.prompt_token_ids == tuple(h.gateway.text.encode("hello world"))
            assert dispatch.sampling.seed is not None and dispatch.sampling.temperature == 0.5
            assert h.cluster.headers[0].reply_addr == h.gateway.config.inbox.advertise
            await wait_until(lambda: h.cluster.release_reasons() == ["finished"])
            by_ids = await client.generate(prompt_token_ids=[5, 6, 7], max_tokens=3, seed=4)
            assert by_ids.token_ids == tuple(expected(h, 3)) and by_ids.num_prompt_tokens == 3
            assert h.cluster.dispatches[1].sampling.seed == 4
            assert out.num_cached_prompt_tokens == by_ids.num_cached_prompt_tokens == 0
            h.worker.behaviour.num_cached_prompt_tokens = 2
            cached = await client.generate(prompt_token_ids=[5, 6, 7], max_tokens=3)
            chunks = [c async for c in client.stream(prompt_token_ids=[5, 6, 7], max_tokens=3)]
            assert cached.num_cached_prompt_tokens == 2
            assert [c.num_cached_prompt_tokens for c in chunks] == [2] * len(chunks)

    arun(body())


def test_logprobs_reach_the_sdk_streamed_and_not(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.chunk_size = 3
            out = await client.generate("hello", max_tokens=7, logprobs=2, presence_penalty=0.5)
            assert out.logprobs == tuple(fake_logprobs(t, 2) for t in out.token_ids)
            assert h.cluster.dispatches[-1].sampling.presence_penalty == 0.5
            chunks = [c async for c in client.stream("hello", max_tokens=7, logprobs=0)]
            assert [lp for c in chunks for lp in c.logprobs] == [
                fake_logprobs(t, 0) for c in chunks for t in c.token_ids]
            assert (await client.generate("hello", max_tokens=3)).logprobs == ()

    arun(body())


def test_stream_yields_ordered_chunks_matching_generate(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.chunk_size = 3
            stream = client.stream("hi", max_tokens=20)
            chunks = [c async for c in stream]
            assert [c.first_index for c in chunks] == list(range(0, 20, 3))[: len(chunks)]
            assert [t for c in chunks for t in c.token_ids] == expected(h, 20)
            assert "".join(c.text for c in chunks) == h.gateway.text.decode(expected(h, 20))
            assert [c.finish_reason for c in chunks][-1] == "length"
            assert all(c.finish_reason is None for c in chunks[:-1])
            assert stream.req_id == chunks[0].req_id

    arun(body())


def test_duplicated_token_messages_reach_the_client_once(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.duplicate = True
            chunks = [c async for c in client.stream("hi", max_tokens=11)]
            assert [t for c in chunks for t in c.token_ids] == expected(h, 11)

    arun(body())


def test_many_concurrent_requests_share_one_connection(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            outs = await asyncio.gather(*(
                client.generate(prompt_token_ids=[1 + i % 50], max_tokens=1 + i % 9)
                for i in range(120)))
            assert [len(o.token_ids) for o in outs] == [1 + i % 9 for i in range(120)]
            assert all(o.token_ids == tuple(expected(h, len(o.token_ids))) for o in outs)
            assert len({o.req_id for o in outs}) == 120
            await h.wait_idle()

    arun(body())


def test_stop_string_and_eos(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            out = await client.generate("x", max_tokens=40, stop=["fox", "dog"])
            assert out.text == "the quick brown " and out.finish_reason == "stop"
            await wait_until(lambda: "stop" in h.cluster.release_reasons())
            h.worker.behaviour.eos_at = 4
            out = await client.generate("x", max_tokens=40)
            assert out.finish_reason == "stop" and len(out.token_ids) == 5
            assert out.text == h.gateway.text.decode(expected(h, 4))
            eos = h.gateway.text.eos_token_ids[0]
            assert eos in h.cluster.dispatches[-1].sampling.stop_token_ids

    arun(body())


# ---- abort and timeouts -------------------------------------------------------------------


def test_closing_a_stream_early_aborts_the_request(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.token_delay_s = 0.02
            stream = client.stream("hi", max_tokens=200)
            async for chunk in stream:
                if chunk.first_index >= 2:
                    break
            await stream.aclose()
            await wait_until(lambda: h.cluster.release_reasons() == ["abort"])
            await h.wait_idle()
            assert not h.worker.tasks  # the worker was told to stop

    arun(body())


def test_cancelling_the_task_aborts_the_request(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.hold = True
            task = asyncio.get_running_loop().create_task(client.generate("hi", max_tokens=5))
            await wait_until(lambda: len(h.gateway.table) == 1)
            task.cancel()
            await wait_until(lambda: h.cluster.release_reasons() == ["abort"])
            assert len(h.gateway.table) == 0

    arun(body())


def test_explicit_abort_by_client_req_id(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.hold = True
            stream = client.stream("hi", max_tokens=5)
            await stream.start()
            await wait_until(lambda: len(h.gateway.table) == 1)
            client.abort(stream.client_req_id)
            await wait_until(lambda: h.cluster.release_reasons() == ["abort"])

    arun(body())


def test_gateway_deadline_is_a_timeout(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.hold = True
            start = time.monotonic()
            with pytest.raises(Timeout) as err:
                await client.generate("hi", max_tokens=5, timeout_s=0.2)
            assert err.value.code == 504 and time.monotonic() - start < 0.9
            await wait_until(lambda: h.cluster.release_reasons() == ["timeout"])
            # a stream gets what arrived, a last chunk saying "timeout", then the error
            h.worker.behaviour.hold = False
            h.worker.behaviour.token_delay_s = 0.05
            stream = client.stream("hi", max_tokens=100, timeout_s=0.3)
            chunks = []
            with pytest.raises(Timeout):
                async for chunk in stream:
                    chunks.append(chunk)
            assert chunks[-1].finish_reason == "timeout"
            assert [t for c in chunks for t in c.token_ids] == expected(h, sum(
                len(c.token_ids) for c in chunks))
            assert len(chunks) > 2

    arun(body())


def test_client_side_timeout_when_the_gateway_is_unreachable(model_dir):
    async def body():
        async with AsyncClient(tcp(free_ports(1)[0])) as client:
            start = time.monotonic()
            with pytest.raises(Timeout) as err:
                await client.generate("hi", timeout_s=0.1)
            assert err.value.code == 0  # the client's own timer
            assert 1.0 <= time.monotonic() - start < 2.5

    arun(body())


# ---- typed errors -------------------------------------------------------------------------


def test_errors_map_to_exception_types(model_dir):
    async def body():
        async with running(model_dir, max_tokens_limit=50) as h, AsyncClient(h.sdk_addr) as client:
            with pytest.raises(BadRequest, match="max_tokens must be at most 50"):
                await client.generate("hi", max_tokens=51)
            with pytest.raises(BadRequest, match="maximum context length is 256"):
                await client.generate(prompt_token_ids=[1] * 250, max_tokens=10)
            with pytest.raises(BadRequest, match="exactly one of prompt"):
                await client.generate("hi", prompt_token_ids=[1])
            with pytest.raises(BadRequest, match="exceeds"):  # over the frame limit, locally
                await client.generate("x" * (17 * 1024 * 1024))
            with pytest.raises(BadRequest, match="temperature"):  # checked before sending
                await client.generate("hi", temperature=-1)
            with pytest.raises(BadRequest, match="top_p"):  # at the call, not on iteration
                client.stream("hi", top_p=0.0)
            unsent = client.stream("hi")
            unsent.abort()  # never sent: nothing reaches the gateway
            assert [c async for c in unsent] == []
            h.cluster.reject_code = 503
            with pytest.raises(Unavailable, match="no instance can take it"):
                await client.generate("hi")
            h.cluster.reject_code = None
            assert (await client.generate("hi", max_tokens=2)).finish_reason == "length"
            assert len(h.gateway.table) == 0
            assert len(h.cluster.dispatches) == 2  # the rejected one and the last

    arun(body())


def test_api_keys(model_dir):
    async def body():
        async with running(model_dir, api_keys=("k1", "k2")) as h:
            for key in (None, "nope"):
                async with AsyncClient(h.sdk_addr, api_key=key) as client:
                    with pytest.raises(Unauthorized):
                        await client.generate("hi")
            async with AsyncClient(h.sdk_addr, api_key="k2") as client:
                assert len((await client.generate("hi", max_tokens=3)).token_ids) == 3

    arun(body())


def test_inflight_bound_is_429(model_dir):
    async def body():
        async with running(model_dir, max_inflight=2) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.hold = True
            held = [client.stream("hi") for _ in range(2)]
            for stream in held:
                await stream.start()
            await wait_until(lambda: len(h.gateway.table) == 2)
            with pytest.raises(Overloaded, match="2 requests in flight"):
                await client.generate("hi")
            for stream in held:
                await stream.aclose()
            await h.wait_idle()
            h.worker.behaviour.hold = False
            assert len((await client.generate("hi", max_tokens=2)).token_ids) == 2

    arun(body())


# ---- malformed input ----------------------------------------------------------------------


def raw_generate_body(client_req_id, **overrides):
    fields = dict(client_req_id=client_req_id, prompt=None, prompt_token_ids=[1, 2],
                  sampling=[4, 1.0, 0, 1.0, None, [], False, []], priority=0, stream=False,
                  timeout_s=None, api_key=None)
    fields.update(overrides)
    return msgpack.packb(list(fields.values()))


def test_bad_frames_on_the_sdk_socket_get_error_replies(model_dir):
    gen_tag = wire.REGISTRY.tag_of(wire.GenerateRequest)
    header = HEADER.pack(PROTOCOL_VERSION, gen_tag)
    cases = [
        ([header, b"\xc1\xff\x00"], 400, None, "malformed msgpack"),
        ([HEADER.pack(PROTOCOL_VERSION, 999), b"\x90"], 400, None, "unknown message tag"),
        ([HEADER.pack(PROTOCOL_VERSION, wire.REGISTRY.tag_of(wire.Tokens)), b"\x90"], 400, None,
         "not accepted on this socket"),
        ([header, raw_generate_body("c1", prompt_token_ids="1,2")], 400, "c1",
         "prompt_token_ids: expected an array"),
        ([header, raw_generate_body("c2", stream="yes")], 400, "c2", "stream: expected bool"),
        ([header, raw_generate_body("c3", sampling=[1])], 400, "c3", "expected 8 to 20 fields"),
        ([header, raw_generate_body("c4", prompt_token_ids=list(range(3000)))], 413, "c4",
         "exceeds 4096"),
        ([header, raw_generate_body("c5", prompt="hi")], 400, "c5", "exactly one of prompt"),
        ([header, raw_generate_body("c6", priority=7)], 400, "c6", "unknown priority 7"),
        ([header, raw_generate_body("c7", timeout_s=0)], 400, "c7", "timeout_s must be > 0"),
        ([HEADER.pack(PROTOCOL_VERSION + 1, gen_tag), b"\x90"], 426, None, "protocol version"),
        ([header], 400, None, "expected 2 frames"),
    ]

    async def body():
        async with running(model_dir, max_frame_bytes=4096) as h:
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(h.sdk_addr)
            good = wire.encode(wire.GenerateRequest(
                client_req_id="ok", prompt="hi", prompt_token_ids=None,
                sampling=SamplingParams(max_tokens=2), priority=0, stream=False, timeout_s=None))
            try:
                for frames, code, client_req_id, match in cases:
                    await sock.send_multipart(frames)
                    reply = wire.decode(await sock.recv_multipart())
                    assert isinstance(reply, wire.ErrorReply)
                    assert (reply.code, reply.client_req_id) == (code, client_req_id)
                    assert match in reply.message
                    await sock.send_multipart(good)  # still serving
                    reply = wire.decode(await sock.recv_multipart())
                    assert isinstance(reply, wire.TokenChunk) and reply.finish_reason == "length"
                # duplicate client_req_id while the first is in flight
                h.worker.behaviour.hold = True
                await sock.send_multipart(good)
                await sock.send_multipart(good)
                reply = wire.decode(await sock.recv_multipart())
                assert (reply.code, reply.client_req_id) == (400, "ok")
            finally:
                sock.close(linger=0)

    arun(body())


def test_bad_frames_on_the_inbox_are_dropped_and_counted(model_dir):
    tokens_tag = wire.REGISTRY.tag_of(wire.Tokens)
    junk = [
        [HEADER.pack(PROTOCOL_VERSION, tokens_tag), b"\xc1"],  # malformed msgpack
        [HEADER.pack(PROTOCOL_VERSION, 999), b"\x90"],  # unknown tag
        [HEADER.pack(PROTOCOL_VERSION, tokens_tag), msgpack.packb(["r", "w0", "0", [1], None])],
        [HEADER.pack(PROTOCOL_VERSION, tokens_tag), msgpack.packb(["r", "w0", 0, [1] * 5000, None])],
        wire.encode(wire.CancelRequest(client_req_id="x")),  # not accepted on the inbox
        [b"\x01"],
    ]

    async def body():
        async with running(model_dir, max_frame_bytes=4096) as h, AsyncClient(h.sdk_addr) as client:
            for frames in junk:
                await h.cluster.push_frames(h.gateway.config.inbox.advertise, frames)
                assert len((await client.generate("hi", max_tokens=3)).token_ids) == 3
            assert h.gateway.recv_from_cluster.num_rejected == len(junk)

    arun(body())


# ---- failures: replay, bypass -------------------------------------------------------------


def test_instance_down_replays_without_duplicates(model_dir):
    async def body():
        async with running(model_dir, num_workers=2) as h, AsyncClient(h.sdk_addr) as client:
            dying, healthy = h.cluster.workers
            dying.behaviour.die_after = 6
            dying.behaviour.token_delay_s = 0.01
            stream = client.stream("hi", max_tokens=15)
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
                if sum(len(c.token_ids) for c in chunks) == 6:
                    await h.cluster.instance_down(dying)
            assert [t for c in chunks for t in c.token_ids] == expected(h, 15)
            assert chunks[-1].finish_reason == "length"
            replay = h.cluster.dispatches[-1]
            assert replay.output_token_ids == tuple(expected(h, 6))
            assert replay.sampling.max_tokens == 15  # the 6 replayed outputs count
            assert replay.sampling.seed == h.cluster.dispatches[0].sampling.seed
            assert h.gateway.metrics.replays._value.get() == 1
            assert len(healthy.tasks) == 0 and len(h.cluster.dispatches) == 2

    arun(body())


def test_a_scheduler_restart_re_dispatches_what_it_held_unplaced(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            h.cluster.hold = True  # the scheduler keeps it pending, then restarts
            task = asyncio.create_task(client.generate("hi", max_tokens=4))
            await wait_until(lambda: len(h.cluster.dispatches) == 1, what="dispatch")
            h.cluster.hold = False
            h.cluster.epoch = "e2"
            out = await task
            assert out.token_ids == tuple(expected(h, 4))
            first, again = h.cluster.dispatches
            assert again.req_id == first.req_id and again.output_token_ids == ()

    arun(body())


def test_bypass_mode_when_the_scheduler_goes_silent(model_dir):
    async def body():
        async with running(model_dir, num_workers=2, bypass_after_s=0.2) as h, \
                AsyncClient(h.sdk_addr) as client:
            h.cluster.alive = False  # no more views, no answers
            await wait_until(lambda: h.gateway.routes.bypass, what="bypass mode")
            assert h.gateway.metrics.bypass._value.get() == 1
            outs = [await client.generate("hi", max_tokens=4) for _ in range(4)]
            assert all(o.token_ids == tuple(expected(h, 4)) for o in outs)
            direct = [len(w.direct_dispatches) for w in h.cluster.workers]
            assert direct == [2, 2]  # round robin over the last view
            # an abort goes straight to the worker holding the request
            h.cluster.workers[0].behaviour.hold = True
            h.cluster.workers[1].behaviour.hold = True
            stream = client.stream("hi")
            await stream.start()
            await wait_until(lambda: sum(len(w.tasks) for w in h.cluster.workers) == 1)
            await stream.aclose()
            await wait_until(lambda: sum(len(w.aborts) for w in h.cluster.workers) == 1)
            assert h.cluster.releases == []
            # the scheduler comes back
            h.cluster.alive = True
            await wait_until(lambda: not h.gateway.routes.bypass, what="normal mode")
            for w in h.cluster.workers:
                w.behaviour.hold = False
            await client.generate("hi", max_tokens=2)
            assert len(h.cluster.dispatches) == 1
            # a worker dies: the gateway closes the socket its bypass dispatches used
            dead, alive = h.cluster.workers
            outboxes = h.gateway.send_to_cluster
            assert dead.inbox_addr in outboxes and alive.inbox_addr in outboxes
            await h.cluster.instance_down(dead)
            await wait_until(lambda: dead.inbox_addr not in outboxes, what="socket closed")
            assert alive.inbox_addr in outboxes

    arun(body())


def test_what_waited_for_a_dead_scheduler_never_reaches_its_successor(model_dir):
    """A Dispatch sent while the scheduler is dead waits in the gateway's queue to it (ZMQ
    keeps it for the reconnection). Bypass mode sends the request to a worker instead, so
    the queue is dropped then: a restarted scheduler must not get it and start the request
    again, a stale copy (or, after the client is long gone, one run for nobody: seen in
    `ferry bench chaos`, phases kill_scheduler and kill_scheduler_45s)."""
    async def body():
        async with running(model_dir, num_workers=1, bypass_after_s=0.3) as h, \
                AsyncClient(h.sdk_addr) as client:
            h.cluster.alive = False
            h.cluster.tasks[0].cancel()  # the scheduler process dies
            h.cluster.recv_from_gateway.close(linger=0)
            await asyncio.sleep(0.2)
            out = await client.generate("hi", max_tokens=4)  # sent, then re-sent in bypass
            assert out.token_ids == tuple(expected(h, 4))
            assert h.gateway.routes.bypass and len(h.worker.direct_dispatches) == 1
            successor = h.cluster.ctx.socket(zmq.PULL)
            successor.bind(h.gateway.config.scheduler_addr)
            try:
                got = []
                deadline = time.monotonic() + 1.5  # a GatewayHello comes each second
                while time.monotonic() < deadline:
                    if await successor.poll(100):
                        got.append(type(wire.decode(await successor.recv_multipart())))
            finally:
                successor.close(linger=0)
            assert wire.GatewayHello in got and wire.Dispatch not in got, got

    arun(body())


def test_no_instances_in_bypass_is_503(model_dir):
    async def body():
        async with running(model_dir, num_workers=0, bypass_after_s=0.1) as h, \
                AsyncClient(h.sdk_addr) as client:
            h.cluster.alive = False
            await wait_until(lambda: h.gateway.routes.bypass)
            with pytest.raises(Unavailable, match="no instance available"):
                await client.generate("hi")

    arun(body())


def test_gateway_announces_itself_until_the_first_view(model_dir):
    async def body():
        async with running(model_dir, scheduler_alive=False) as h:
            await wait_until(lambda: len(h.cluster.hellos) >= 2, what="hellos")
            assert h.gateway.routes.view is None  # silent scheduler: still asking
            h.cluster.alive = True
            await wait_until(lambda: h.gateway.routes.view is not None, what="a view")
            num_hellos = len(h.cluster.hellos)
            await asyncio.sleep(0.7)
            assert len(h.cluster.hellos) == num_hellos  # known now: no more hellos
            assert h.cluster.hellos[0].inbox_addr == h.gateway.config.inbox.advertise
            assert h.cluster.dispatches == []

    arun(body())


# ---- the blocking client ------------------------------------------------------------------


def test_blocking_client_from_many_threads(model_dir):
    with ThreadedHarness(model_dir) as h, Client(h.sdk_addr) as client:
        results: dict[int, tuple[int, ...]] = {}

        def worker(n: int) -> None:
            for k in range(5):
                results[n * 10 + k] = client.generate("hi", max_tokens=1 + k).token_ids

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 40
        assert all(ids == tuple(expected(h, 1 + key % 10)) for key, ids in results.items())

        chunks = list(client.stream("hi", max_tokens=9))
        assert [t for c in chunks for t in c.token_ids] == expected(h, 9)


def test_blocking_stream_closed_early_aborts(model_dir):
    threaded = ThreadedHarness(model_dir)
    with threaded as h, Client(h.sdk_addr) as client:
        h.worker.behaviour.token_delay_s = 0.02
        stream = client.stream("hi", max_tokens=200)
        for chunk in stream:
            if chunk.first_index >= 2:
                break
        stream.close()
        threaded.call(wait_until(lambda: h.cluster.release_reasons() == ["abort"]))
        # dropping an unfinished stream aborts too
        h.worker.behaviour.hold = True
        stream = client.stream("hi")
        stream.start()
        threaded.call(wait_until(lambda: len(h.gateway.table) == 1))
        del stream
        threaded.call(wait_until(lambda: h.cluster.release_reasons() == ["abort", "abort"]))
        with pytest.raises(Timeout):
            client.generate("hi", timeout_s=0.1)


def test_a_frame_past_the_hard_cap_drops_only_that_connection(model_dir):
    async def body():
        async with running(model_dir, max_frame_bytes=4096) as h, AsyncClient(h.sdk_addr) as client:
            rogue = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(h.sdk_addr)
            try:
                header = HEADER.pack(PROTOCOL_VERSION, wire.REGISTRY.tag_of(wire.GenerateRequest))
                await rogue.send_multipart([header, b"\x00" * 100_000])  # libzmq drops it
                outs = await asyncio.gather(*(client.generate("hi", max_tokens=3) for _ in range(5)))
                assert all(len(o.token_ids) == 3 for o in outs)
            finally:
                rogue.close(linger=0)

    arun(body())


def test_long_prompts_are_tokenized_off_the_loop(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", max_model_len=40_000)
    prompt = "the quick brown fox " * 2000  # 40k characters: tokenized in a thread

    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            out, short = await asyncio.gather(client.generate(prompt, max_tokens=3),
                                              client.generate("hi", max_tokens=3))
            assert out.num_prompt_tokens == len(h.gateway.text.encode(prompt))
            assert len(out.token_ids) == len(short.token_ids) == 3
            # cancelled while tokenizing: it never starts
            stream = client.stream(prompt + "jumps", max_tokens=3)  # would fit
            await stream.start()
            await stream.aclose()
            await asyncio.sleep(0.5)
            assert len(h.cluster.dispatches) == 2
            assert h.gateway.sdk.req_ids == {}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{h.base_url}/v1/completions",
                                        json={"prompt": prompt, "max_tokens": 2}) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["usage"]["prompt_tokens"] == out.num_prompt_tokens

    arun(body())


def test_long_prompts_count_against_the_inflight_bound(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", max_model_len=40_000)
    prompt = "the quick brown fox " * 2000

    async def body():
        async with running(model_dir, max_inflight=1) as h, AsyncClient(h.sdk_addr) as client:
            h.worker.behaviour.hold = True
            held = client.stream("hi")
            await held.start()
            await wait_until(lambda: len(h.gateway.table) == 1)
            with pytest.raises(Overloaded):
                await client.generate(prompt)
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{h.base_url}/v1/completions",
                                        json={"prompt": prompt}) as resp:
                    assert resp.status == 429
            assert h.gateway.num_tokenizing == 0
            assert [cid for _, cid in h.gateway.sdk.req_ids] == [held.client_req_id]

    arun(body())


def test_retries_on_overloaded_and_unavailable_before_any_output(model_dir):
    async def body():
        async with running(model_dir) as h:
            async with AsyncClient(h.sdk_addr, max_retries=2, retry_backoff_s=0.01) as client:
                h.cluster.reject_next = [429, 503]
                out = await client.generate("hi", max_tokens=3)
                assert len(out.token_ids) == 3 and len(h.cluster.dispatches) == 3
                h.cluster.reject_next = [503]
                chunks = [c async for c in client.stream("hi", max_tokens=3)]
                assert [t for c in chunks for t in c.token_ids] == expected(h, 3)
                h.cluster.reject_next = [503, 503, 503]
                with pytest.raises(Unavailable):
                    await client.generate("hi")
                assert len(h.cluster.dispatches) == 8
                h.cluster.reject_next = [400]  # not retried
                with pytest.raises(BadRequest):
                    await client.generate("hi")
                assert len(h.cluster.dispatches) == 9
            async with AsyncClient(h.sdk_addr) as client:  # off by default
                h.cluster.reject_next = [429]
                with pytest.raises(Overloaded):
                    await client.generate("hi")

    arun(body())


def test_prompt_text_too_long_for_any_tokenization_is_refused_untokenized(model_dir):
    async def body():
        async with running(model_dir) as h, AsyncClient(h.sdk_addr) as client:
            text = h.gateway.text
            calls = []
            encode = text.encode
            text.encode = lambda s, **kw: calls.append(len(s)) or encode(s, **kw)
            for size in (text.max_prompt_chars + 1, 200_000):  # short path, long path
                with pytest.raises(BadRequest, match="maximum context length is 256 tokens; "
                                                     f"the prompt has {size} characters"):
                    await client.generate("x" * size, max_tokens=2)
            assert calls == [] and h.gateway.num_tokenizing == 0 and h.gateway.sdk.req_ids == {}
            assert (await client.generate("hi", max_tokens=2)).finish_reason == "length"

    arun(body())
