"""The SDK's pure parts: error mapping, the bounded reply buffer, argument checks."""

from __future__ import annotations

import asyncio

import pytest

from ferry import (
    AsyncClient,
    BadRequest,
    Client,
    Overloaded,
    ServerError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from ferry.client import MAX_BUFFERED_CHUNKS, _Replies
from ferry.common import wire
from ferry.errors import FerryError, error_from_reply


@pytest.mark.parametrize(
    ("code", "cls"),
    [(400, BadRequest), (413, BadRequest), (401, Unauthorized), (429, Overloaded),
     (503, Unavailable), (504, Timeout), (500, ServerError), (426, ServerError)],
)
def test_error_codes_map_to_classes(code, cls):
    err = error_from_reply(code, "why")
    assert type(err) is cls and isinstance(err, FerryError)
    assert err.code == code and "why" in str(err)


def test_timeout_is_also_a_builtin_timeout_error():
    assert isinstance(error_from_reply(504, "late"), TimeoutError)


def chunk(first_index, token_ids, text, finish_reason=None):
    return wire.TokenChunk(client_req_id="c", req_id="r", first_index=first_index,
                           token_ids=tuple(token_ids), text=text, finish_reason=finish_reason,
                           num_prompt_tokens=3)


def test_reply_buffer_merges_when_full():
    async def body():
        replies = _Replies()
        for i in range(MAX_BUFFERED_CHUNKS + 10):
            replies.put(chunk(i, [i], str(i % 10)))
        replies.put(chunk(MAX_BUFFERED_CHUNKS + 10, [], "!", "length"))
        assert len(replies.chunks) == MAX_BUFFERED_CHUNKS
        got = [await replies.get() for _ in range(MAX_BUFFERED_CHUNKS)]
        assert [t for c in got for t in c.token_ids] == list(range(MAX_BUFFERED_CHUNKS + 10))
        last = got[-1]
        assert last.first_index == MAX_BUFFERED_CHUNKS - 1 and last.finish_reason == "length"
        assert "".join(c.text for c in got).endswith("!")

    asyncio.run(body())


def test_reply_buffer_raises_the_error_after_the_chunks():
    async def body():
        replies = _Replies()
        replies.put(chunk(0, [1], "a"))
        replies.put(wire.ErrorReply(client_req_id="c", code=503, message="gone"))
        assert (await replies.get()).token_ids == (1,)
        with pytest.raises(Unavailable, match="gone"):
            await replies.get()

    asyncio.run(body())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"priority": "urgent"}, "priority"),
        ({"prompt_token_ids": [1]}, "exactly one of prompt"),
        ({"max_token": 5}, "unknown argument 'max_token'"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": 20}, "min_tokens"),
        ({"min_p": None}, "float"),
        ({"response_format": {"type": "json_object"}}, "unknown argument 'response_format'"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "only one of"),
        ({"guided_choice": "yes"}, "guided_choice must be a list of strings"),
        ({"guided_regex": "a+", "ignore_eos": True}, "cannot be combined"),
    ],
)
def test_arguments_are_checked_before_anything_is_sent(kwargs, match):
    client = AsyncClient("tcp://127.0.0.1:1")
    with pytest.raises(BadRequest, match=match):
        client.stream("hi", **kwargs)
    assert client._socket is None  # nothing connected, nothing sent


def test_sampling_arguments_travel_in_the_request():
    client = AsyncClient("tcp://127.0.0.1:1")
    stream = client.stream("hi", presence_penalty=0.5, frequency_penalty=1, repetition_penalty=1.1,
                           min_p=0.05, min_tokens=2, logit_bias={7: -100, 9: 2.5}, logprobs=3,
                           stop_token_ids=[4], include_stop_str_in_output=True,
                           skip_special_tokens=False)
    s = wire.decode(stream._frames).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, 1.0, 1.1)
    assert (s.min_p, s.min_tokens, s.logprobs, s.stop_token_ids) == (0.05, 2, 3, (4,))
    assert (s.logit_bias_token_ids, s.logit_bias_values) == ((7, 9), (-100.0, 2.5))
    assert s.include_stop_str_in_output and not s.skip_special_tokens
    s = wire.decode(client.stream("hi", guided_json={"type": "object"})._frames).sampling
    assert (s.grammar_kind, s.grammar) == ("json", '{"type":"object"}')
    s = wire.decode(client.stream("hi", guided_choice=("a", "b"))._frames).sampling
    assert (s.grammar_kind, s.grammar) == ("choice", '["a", "b"]')


def test_the_blocking_client_names_an_unknown_argument_too():
    with Client("tcp://127.0.0.1:1") as client:
        with pytest.raises(BadRequest, match="unknown argument 'temprature'"):
            client.generate("hi", temprature=0.5)
        with pytest.raises(BadRequest, match="unknown argument 'temprature'"):
            client.stream("hi", temprature=0.5)


def test_stream_is_lazy_and_stop_strings_normalize():
    client = AsyncClient("tcp://127.0.0.1:1", api_key="k")
    stream = client.stream("hi", stop="\n", priority="high", max_tokens=4)
    assert client._socket is None and stream.req_id is None
    msg = wire.decode(stream._frames)
    assert msg.sampling.stop == ("\n",) and msg.priority == int(wire.Priority.HIGH)
    assert msg.stream and msg.api_key == "k" and msg.timeout_s == client.timeout_s
    assert client.stream("hi").client_req_id != stream.client_req_id


def test_a_dead_gateway_fails_the_requests_in_flight_within_seconds():
    """The gateway takes the request, then its process dies: the client hears it from
    the connection (not after its 600 s deadline) as ConnectionLost, and the next request
    on the same client reaches a gateway started again at the same address."""
    import time

    import zmq
    import zmq.asyncio

    from ferry import ConnectionLost
    from tests.e2e.test_gateway_harness import free_ports, tcp

    async def body():
        addr = tcp(free_ports(1)[0])
        ctx = zmq.asyncio.Context.instance()
        gateway = ctx.socket(zmq.ROUTER)
        gateway.setsockopt(zmq.LINGER, 0)
        gateway.bind(addr)
        async with AsyncClient(addr, timeout_s=600) as client:
            stream = client.stream("hi", max_tokens=4)
            await stream.start()
            route, *frames = await gateway.recv_multipart()  # taken, never answered
            start = time.monotonic()
            gateway.close(linger=0)  # the process dies
            with pytest.raises(ConnectionLost, match="lost the connection"):
                await stream.__anext__()
            assert time.monotonic() - start < 5.0
            gateway = ctx.socket(zmq.ROUTER)  # restarted
            gateway.setsockopt(zmq.LINGER, 0)
            gateway.bind(addr)
            second = client.stream("again", max_tokens=1)
            await second.start()
            route, *frames = await asyncio.wait_for(gateway.recv_multipart(), 10)
            request = wire.decode(frames)
            await gateway.send_multipart([route, *wire.encode(wire.TokenChunk(
                client_req_id=request.client_req_id, req_id="r1", first_index=0,
                token_ids=(5,), text="x", finish_reason="length", num_prompt_tokens=1))])
            assert (await second.__anext__()).finish_reason == "length"
        gateway.close(linger=0)

    asyncio.run(asyncio.wait_for(body(), 30))
