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
from ferry.common.sampling import SamplingParams
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


# ---- vLLM's sampling parameters on the real model --------------------------------------------


class _ModelReference:
    """The tiny model in this process: its logits at every position of a sequence."""

    def __init__(self, model_dir: str) -> None:
        import torch

        from ferry.services.worker.runner import ModelRunner, RunnerConfig

        self.torch = torch
        self.runner = ModelRunner(RunnerConfig(model_dir=model_dir, num_blocks=64))

    def logits(self, token_ids: list[int]):  # [len, vocab] float32, position i predicts i + 1
        from ferry.services.worker.engine.batch import SeqChunk
        from ferry.services.worker.runner import prepare_inputs

        blocks = tuple(range(-(-len(token_ids) // self.runner.block_size)))
        chunk = SeqChunk(req_id="ref", token_ids=tuple(token_ids), start_pos=0,
                         block_ids=blocks, sample=True, sampling=SamplingParams(seed=0))
        with self.torch.inference_mode():
            inputs = prepare_inputs([chunk], block_size=self.runner.block_size,
                                    device=self.runner.device)
            hidden = self.runner.model(inputs.input_ids, inputs.positions, self.runner.kv_cache,
                                       inputs.meta)
            return self.runner.model.compute_logits(hidden)


def test_sampling_parameters_on_the_tiny_model(cluster):
    """logprobs are the model's distribution; penalties, logit_bias and min_tokens act as
    vLLM's; n=3 gives 3 choices; an unknown field is a 400 naming it (official client)."""
    import math

    import openai

    from ferry import Client
    from tests.unit.test_sampler import _reference_logits

    ref = _ModelReference(cluster.ready["model"])
    prompt = list(range(300, 340))
    oai = openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)
    with Client(cluster.sdk_addr) as client:
        # logprobs: the raw distribution at each position (not the sampling temperature's)
        kwargs = dict(prompt_token_ids=prompt, max_tokens=8, temperature=1.3, seed=5,
                      ignore_eos=True, logprobs=5)
        out = client.generate(**kwargs)
        logprobs = ref.logits(prompt + list(out.token_ids)).log_softmax(dim=-1)
        for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = logprobs[len(prompt) - 1 + i]
            assert lp.logprob == pytest.approx(row[token].item(), abs=1e-3)
            assert list(lp.top_token_ids) == row.topk(5).indices.tolist()
            assert sum(math.exp(v) for v in lp.top_logprobs) <= 1.0 + 1e-5
        http = oai.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.3,
                                      seed=5, logprobs=5, extra_body={"ignore_eos": True})
        assert http.choices[0].logprobs.token_logprobs == pytest.approx(
            [lp.logprob for lp in out.logprobs], abs=1e-6)
        chat = oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
        for entry in chat.choices[0].logprobs.content:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
            assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-5

        # penalties: greedy decoding of the penalized logits, step by step
        params = dict(presence_penalty=1.5, frequency_penalty=0.8, repetition_penalty=1.3)
        got = client.generate(prompt_token_ids=prompt, max_tokens=12, temperature=0.0,
                              ignore_eos=True, **params).token_ids
        sampling = SamplingParams(ignore_eos=True, **params)
        want: list[int] = []
        for _ in range(12):
            row = ref.logits(prompt + want)[-1]
            want.append(int(_reference_logits(row, sampling, prompt, want).argmax()))
        assert list(got) == want
        plain = client.generate(prompt_token_ids=prompt, max_tokens=12, temperature=0.0,
                                ignore_eos=True).token_ids
        assert list(plain) != want  # they did change the output

        # logit_bias and min_tokens
        biased = oai.completions.create(model="tiny", prompt=prompt, max_tokens=5,
                                        temperature=0.9, logit_bias={"777": 100},
                                        extra_body={"ignore_eos": True})
        assert biased.choices[0].text == ref_text(cluster, [777] * 5)
        first = plain[0]
        held = client.generate(prompt_token_ids=prompt, max_tokens=6, temperature=0.0,
                               stop_token_ids=[first], min_tokens=3)
        assert first not in held.token_ids[:3] and len(held.token_ids) >= 3

        # n choices, and refusals naming the field
        three = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, n=3, seed=9,
                                       temperature=1.0, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in three.choices) == [0, 1, 2]
        assert len({c.text for c in three.choices}) > 1
        assert three.usage.completion_tokens == 18
        with pytest.raises(openai.BadRequestError, match="supplied: frequency_penalti"):
            oai.completions.create(model="tiny", prompt="x", max_tokens=2,
                                   extra_body={"frequency_penalti": 1.0})
    oai.close()
    cluster.wait_idle()


def ref_text(cluster, token_ids: list[int]) -> str:
    from ferry.common.text import TextModel

    return TextModel.load(cluster.ready["model"]).decode(token_ids)


# ---- structured output and tools (official openai client) ------------------------------------


def test_structured_output_and_tool_calls_through_the_openai_client(cluster):
    """json_schema answers parse and follow the schema, json_object gives an object, a
    named tool_choice returns a call whose arguments follow the function's schema,
    required returns a call, and the streamed call's deltas join to the same call."""
    import json

    import openai

    from tests.unit.test_grammar import PERSON, check_person

    oai = openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Describe a person."}]
    person = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=200, seed=1, response_format={
            "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert person.choices[0].finish_reason == "stop"
    check_person(json.loads(person.choices[0].message.content))
    text = oai.completions.create(model="tiny", prompt="A person:", max_tokens=200, seed=2,
                                  extra_body={"guided_json": PERSON})
    check_person(json.loads(text.choices[0].text))
    anything = oai.chat.completions.create(  # (a random model may never close an object
        model="tiny", messages=messages, max_tokens=200,  # of any keys; seed 5 does)
        seed=5, response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    named = dict(model="tiny", messages=ask, tools=[weather, clock], max_tokens=200, seed=3,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    out = oai.chat.completions.create(**named)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F")
    assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12

    chunks = list(oai.chat.completions.create(**named, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    required = oai.chat.completions.create(**(named | {"tool_choice": "required", "seed": 4}))
    [call] = required.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
