"""The OpenAI-compatible HTTP API against a real gateway (in-process) and a fake cluster:
aiohttp and the official openai client, SSE, errors, 429, disconnect -> abort, timeouts,
auth, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import openai
import pytest
import uvloop

from tests.e2e.test_gateway_harness import running, wait_until
from tests.unit.test_gateway_text import cut_mid_character, make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def arun(coro):
    return uvloop.run(asyncio.wait_for(coro, timeout=30))


def expected(h, n: int) -> list[int]:
    script = h.cluster.script
    return [script[i % len(script)] for i in range(n)]


async def sse_events(response: aiohttp.ClientResponse) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded; "[DONE]" as the string."""
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def post(session, h, path, body, **kwargs):
    async with session.post(h.base_url + path, json=body, **kwargs) as resp:
        return resp.status, await resp.json()


# ---- completions --------------------------------------------------------------------------


def test_completion_non_stream(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            status, data = await post(session, h, "/v1/completions",
                                      {"model": "tiny", "prompt": "hello", "max_tokens": 6})
            assert status == 200
            assert data["id"] == h.cluster.dispatches[0].req_id
            assert data["object"] == "text_completion" and data["model"] == "tiny"
            choice = data["choices"][0]
            assert choice["text"] == h.gateway.text.decode(expected(h, 6))
            assert choice["finish_reason"] == "length"
            prompt_len = len(h.gateway.text.encode("hello"))
            assert data["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 6,
                                     "total_tokens": prompt_len + 6,
                                     "prompt_tokens_details": {"cached_tokens": 0}}
            await wait_until(lambda: h.cluster.release_reasons() == ["finished"])

    arun(body())


def test_completion_stream_sse(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            req = {"prompt": [3, 4, 5], "max_tokens": 9, "stream": True,
                   "stream_options": {"include_usage": True}, "stop": "lazy"}
            async with session.post(h.base_url + "/v1/completions", json=req) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                events = await sse_events(resp)
            assert events[-1] == "[DONE]"
            usage = events[-2]
            assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 3
            chunks = events[:-2]
            assert {c["id"] for c in chunks} == {usage["id"]}
            full = h.gateway.text.decode(expected(h, 9))
            assert "lazy" in full
            assert "".join(c["choices"][0]["text"] for c in chunks) == full.split("lazy")[0]
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
            assert usage["usage"]["completion_tokens"] == len(h.gateway.text.encode(
                full[: full.index("lazy") + 4], add_special_tokens=False))
            await wait_until(lambda: h.cluster.release_reasons() == ["stop"])

    arun(body())


def test_chat_stream_and_non_stream(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            messages = [{"role": "user", "content": "hi"}]
            status, data = await post(session, h, "/v1/chat/completions",
                                      {"messages": messages, "max_completion_tokens": 5})
            assert status == 200 and data["object"] == "chat.completion"
            assert data["choices"][0]["message"] == {
                "role": "assistant", "content": h.gateway.text.decode(expected(h, 5))}
            prompt = h.gateway.text.apply_chat_template(messages)
            assert h.cluster.dispatches[0].prompt_token_ids == tuple(
                h.gateway.text.encode(prompt, add_special_tokens=False))
            async with session.post(h.base_url + "/v1/chat/completions", json={
                    "messages": messages, "max_tokens": 5, "stream": True}) as resp:
                events = await sse_events(resp)
            assert events[-1] == "[DONE]"
            deltas = [e["choices"][0]["delta"] for e in events[:-1]]
            assert deltas[0] == {"role": "assistant", "content": ""}
            assert "".join(d.get("content", "") for d in deltas) == \
                h.gateway.text.decode(expected(h, 5))
            assert events[-2]["choices"][0]["finish_reason"] == "length"

    arun(body())


def test_usage_reports_the_cached_prompt_tokens_once(model_dir):
    """Every usage object (completions and chat, whole and streamed, final or continuous)
    says how much of the prompt came from a prefix cache; n choices of one prompt count it
    once, like the prompt."""
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            h.worker.behaviour.num_cached_prompt_tokens = 2
            prompt = {"prompt": [3, 4, 5], "max_tokens": 4}
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            stream = {"stream": True, "stream_options": {"include_usage": True}}
            usages = []
            for path, req in (("/v1/completions", prompt), ("/v1/chat/completions", chat)):
                status, data = await post(session, h, path, req)
                assert status == 200
                usages.append(data["usage"])
                status, data = await post(session, h, path, req | {"n": 3})
                assert status == 200 and len(data["choices"]) == 3
                usages.append(data["usage"])
                async with session.post(h.base_url + path, json=req | stream) as resp:
                    events = await sse_events(resp)
                assert events[-1] == "[DONE]" and events[-2]["choices"] == []
                usages.append(events[-2]["usage"])
            assert [u["prompt_tokens_details"] for u in usages] == [{"cached_tokens": 2}] * 6
            assert [u["completion_tokens"] for u in usages] == [4, 12, 4] * 2
            continuous = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
            async with session.post(h.base_url + "/v1/completions",
                                    json=prompt | continuous) as resp:
                events = await sse_events(resp)
            assert {json.dumps(e["usage"]["prompt_tokens_details"]) for e in events[:-1]} == {
                '{"cached_tokens": 2}'}

    arun(body())


def test_text_ending_mid_character_streamed_and_not(model_dir):
    """The last generated token ends partway through a UTF-8 character: the non-streamed
    text is the streamed text joined, with a trailing U+FFFD (vLLM's answer), not ''."""
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            ids = cut_mid_character(h.gateway.text, "hello world 世界 🚀")
            h.cluster.script = ids
            full = h.gateway.text.tokenizer.decode(ids)
            assert full.endswith("\ufffd")
            req = {"prompt": "hi", "max_tokens": len(ids)}
            status, data = await post(session, h, "/v1/completions", req)
            assert status == 200 and data["usage"]["completion_tokens"] == len(ids)
            assert data["choices"][0]["text"] == full
            async with session.post(h.base_url + "/v1/completions",
                                    json={**req, "stream": True}) as resp:
                events = await sse_events(resp)
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full
            messages = [{"role": "user", "content": "hi"}]
            status, data = await post(session, h, "/v1/chat/completions",
                                      {"messages": messages, "max_tokens": len(ids)})
            assert data["choices"][0]["message"]["content"] == full

    arun(body())


def test_official_openai_client(model_dir):
    async def body():
        async with running(model_dir) as h:
            client = openai.AsyncOpenAI(base_url=h.base_url + "/v1", api_key="unused",
                                        max_retries=0)
            text = h.gateway.text.decode(expected(h, 8))
            out = await client.completions.create(model="tiny", prompt="hello", max_tokens=8,
                                                  seed=3, extra_body={"top_k": 5})
            assert out.choices[0].text == text and out.usage.completion_tokens == 8
            assert out.usage.prompt_tokens_details.cached_tokens == 0
            assert out.id == h.cluster.dispatches[-1].req_id
            assert h.cluster.dispatches[-1].sampling.top_k == 5
            stream = await client.completions.create(model="tiny", prompt="hello", max_tokens=8,
                                                     stream=True)
            assert "".join([c.choices[0].text async for c in stream]) == text
            chat = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                extra_body={"ignore_eos": True, "priority": "high"})
            assert chat.choices[0].message.content == text
            assert h.cluster.headers[-1].priority == 1
            assert h.cluster.dispatches[-1].sampling.ignore_eos
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream]
            assert "".join(parts) == text
            models = await client.models.list()
            assert [m.id for m in models.data] == ["tiny"]
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="other", prompt="x", max_tokens=2)
            with pytest.raises(openai.BadRequestError, match="maximum context length"):
                await client.completions.create(model="tiny", prompt=[1] * 250, max_tokens=10)
            # Nothing a client sends is silently ignored: an unknown field is a 400 naming it.
            with pytest.raises(openai.BadRequestError, match="supplied: max_toknes"):
                await client.completions.create(model="tiny", prompt="x",
                                                extra_body={"max_toknes": 3})
            with pytest.raises(openai.BadRequestError, match="functions is not supported"):
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}],
                    functions=[{"name": "f"}])
            with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}],
                    tool_choice="required")
            stream = await client.completions.create(
                model="tiny", prompt="hello", max_tokens=8, stream=True,
                stream_options={"include_usage": True}, extra_body={
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
            chunks = [c async for c in stream]
            counts = [c.usage.completion_tokens for c in chunks]
            assert counts == sorted(counts) and counts[-1] == 8 and len(counts) > 2
            assert all(c.usage.prompt_tokens == len(h.gateway.text.encode("hello"))
                       for c in chunks)
            await client.close()

    arun(body())


def test_n_logprobs_and_echo_shapes_through_the_openai_client(model_dir):
    """Shapes (fake workers: the semantics are tested on a real model in test_cluster)."""
    async def body():
        async with running(model_dir) as h:
            client = openai.AsyncOpenAI(base_url=h.base_url + "/v1", api_key="unused",
                                        max_retries=0)
            strings = h.gateway.text.token_strings
            out = await client.completions.create(model="tiny", prompt="hello", max_tokens=5,
                                                  n=3, logprobs=2, seed=7)
            assert [c.index for c in out.choices] == [0, 1, 2]
            assert out.usage.completion_tokens == 15
            assert out.usage.prompt_tokens == len(h.gateway.text.encode("hello"))
            seeds = [d.sampling.seed for d in h.cluster.dispatches[-3:]]
            assert seeds[0] == 7 and len(set(seeds)) == 3
            lp = out.choices[1].logprobs
            ids = expected(h, 5)
            assert lp.tokens == strings(ids) and lp.token_logprobs == [-0.25] * 5
            assert lp.top_logprobs[0] == {strings([10])[0]: -1.0, strings([11])[0]: -2.0,
                                          strings([ids[0]])[0]: -0.25}
            assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(strings(ids)[0])
            stream = await client.completions.create(model="tiny", prompt="hello", max_tokens=5,
                                                     n=2, logprobs=1, stream=True)
            chunks = [c async for c in stream]
            by_choice = {0: [], 1: []}
            for c in chunks:
                for ch in c.choices:
                    by_choice[ch.index].append(ch)
            for parts in by_choice.values():
                assert "".join(p.text for p in parts) == h.gateway.text.decode(ids)
                tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
                offsets = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
                assert tokens == strings(ids)
                assert offsets == [sum(map(len, strings(ids)[:i])) for i in range(5)]
                assert parts[-1].finish_reason == "length"
            chat = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                logprobs=True, top_logprobs=2, n=2)
            assert len(chat.choices) == 2
            content = chat.choices[0].logprobs.content
            assert [e.token for e in content] == strings(ids[:4])
            assert content[0].bytes == list(strings(ids[:1])[0].encode())
            assert [t.logprob for t in content[0].top_logprobs] == [-1.0, -2.0]
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                logprobs=True, stream=True)
            entries = [e async for c in stream for ch in c.choices
                       if ch.logprobs for e in ch.logprobs.content]
            assert [e.token for e in entries] == strings(ids[:4])
            assert all(e.top_logprobs == [] for e in entries)
            out = await client.completions.create(model="tiny", prompt="hello", max_tokens=3,
                                                  echo=True)
            assert out.choices[0].text == "hello" + h.gateway.text.decode(ids[:3])
            stream = await client.completions.create(model="tiny", prompt="hello", max_tokens=3,
                                                     echo=True, stream=True)
            assert "".join([c.choices[0].text async for c in stream]) == out.choices[0].text
            await client.close()

    arun(body())


def test_tokenize_detokenize_and_version(model_dir):
    async def body():
        async with running(model_dir, api_keys=("k1",)) as h, \
                aiohttp.ClientSession(headers={"Authorization": "Bearer k1"}) as session:
            status, data = await post(session, h, "/tokenize",
                                      {"model": "tiny", "prompt": "hello world"})
            ids = h.gateway.text.encode("hello world")
            assert status == 200 and data == {"count": len(ids), "max_model_len": 256,
                                              "tokens": ids, "token_strs": None}
            status, data = await post(session, h, "/detokenize", {"tokens": ids})
            assert status == 200 and data == {"prompt": "<s>hello world"}
            status, data = await post(session, h, "/tokenize", {"prompt": "x", "nope": 1})
            assert status == 400 and "nope" in data["error"]["message"]
            async with session.get(h.base_url + "/version") as resp:
                assert resp.status == 200 and (await resp.json())["version"]
            async with aiohttp.ClientSession() as anonymous:  # keyed like /v1/*
                status, _ = await post(anonymous, h, "/tokenize", {"prompt": "x"})
                assert status == 401
                async with anonymous.get(h.base_url + "/version") as resp:
                    assert resp.status == 200

    arun(body())


# ---- bad input ----------------------------------------------------------------------------


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens must be an integer >= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens must be at most 100"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "x", "temperature": [1]}, 400, "temperature must be a number"),
    ("/v1/completions", {"prompt": "x" * 600, "max_tokens": 5}, 400, "maximum context length is 256"),
    ("/v1/completions", {"prompt": [1] * 250, "max_tokens": 10}, 400, "the prompt has 250 tokens"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt token ids must be in"),
    ("/v1/completions", {"prompt": []}, 400, "the prompt is empty"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be in [1, 64]"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of must equal n (1)"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 5}}, 400,
     "logit_bias token ids must be in"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [999999]}, 400,
     "stop_token_ids token ids must be in"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400,
     "echo with logprobs is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs must be an integer in"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 99, "max_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "model": "llama"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "x", "timeout_s": -1}, 400, "timeout_s must be > 0"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages must be a non-empty list"),
    ("/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}', 413, "Too Large"),
    ("/v1/nowhere", {}, 404, "Not Found"),
]


def test_bad_requests_get_openai_errors_and_the_gateway_keeps_serving(model_dir):
    async def body():
        async with running(model_dir, max_frame_bytes=4096, max_tokens_limit=100) as h, \
                aiohttp.ClientSession() as session:
            for path, payload, status, match in BAD_REQUESTS:
                kwargs = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
                async with session.post(h.base_url + path, **kwargs) as resp:
                    data = await resp.json()
                assert resp.status == status, (path, payload, data)
                error = data["error"]
                assert match in error["message"] and error["code"] == status
                assert isinstance(error["type"], str)
                ok, good = await post(session, h, "/v1/completions",
                                      {"prompt": "hi", "max_tokens": 2})
                assert ok == 200 and good["choices"][0]["finish_reason"] == "length"
            async with session.get(h.base_url + "/v1/completions") as resp:
                assert resp.status == 405 and "error" in await resp.json()
            await h.wait_idle()

    arun(body())


def test_inflight_bound_is_429(model_dir):
    async def body():
        async with running(model_dir, max_inflight=1) as h, aiohttp.ClientSession() as session:
            h.worker.behaviour.hold = True
            first = asyncio.ensure_future(post(session, h, "/v1/completions", {"prompt": "x"}))
            await wait_until(lambda: len(h.gateway.table) == 1)
            status, data = await post(session, h, "/v1/completions", {"prompt": "x"})
            assert status == 429 and data["error"]["type"] == "rate_limit_error"
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await h.wait_idle()

    arun(body())


def test_scheduler_rejection_is_503(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            h.cluster.reject_code = 503
            status, data = await post(session, h, "/v1/completions", {"prompt": "x"})
            assert status == 503 and "no instance can take it" in data["error"]["message"]

    arun(body())


# ---- disconnects and timeouts -------------------------------------------------------------


def test_client_disconnect_aborts_non_stream(model_dir):
    async def body():
        async with running(model_dir) as h:
            h.worker.behaviour.hold = True
            timeout = aiohttp.ClientTimeout(total=0.3)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                with pytest.raises(asyncio.TimeoutError):
                    await post(session, h, "/v1/completions", {"prompt": "x"})
            await wait_until(lambda: h.cluster.release_reasons() == ["abort"])
            await h.wait_idle()

    arun(body())


def test_client_disconnect_aborts_stream(model_dir):
    async def body():
        async with running(model_dir) as h:
            h.worker.behaviour.token_delay_s = 0.02
            async with aiohttp.ClientSession() as session:
                resp = await session.post(h.base_url + "/v1/completions",
                                          json={"prompt": "x", "max_tokens": 200, "stream": True})
                assert (await resp.content.readline()).startswith(b"data: ")
                resp.close()  # drop the connection mid-stream
            await wait_until(lambda: h.cluster.release_reasons() == ["abort"])
            await h.wait_idle()

    arun(body())


def test_timeouts(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            h.worker.behaviour.hold = True
            status, data = await post(session, h, "/v1/completions",
                                      {"prompt": "x", "timeout_s": 0.2})
            assert status == 504 and data["error"]["type"] == "timeout"
            await wait_until(lambda: h.cluster.release_reasons() == ["timeout"])
            h.worker.behaviour.hold = False
            h.worker.behaviour.token_delay_s = 0.05
            async with session.post(h.base_url + "/v1/completions", json={
                    "prompt": "x", "max_tokens": 100, "stream": True, "timeout_s": 0.3}) as resp:
                events = await sse_events(resp)
            assert events[-1] == "[DONE]"
            assert events[-2]["error"]["code"] == 504
            assert any(e["choices"][0]["text"] for e in events[:-2])

    arun(body())


# ---- auth, health, metrics ----------------------------------------------------------------


def test_api_keys(model_dir):
    async def body():
        async with running(model_dir, api_keys=("secret",)) as h, aiohttp.ClientSession() as session:
            req = {"prompt": "x", "max_tokens": 2}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
                status, data = await post(session, h, "/v1/completions", req, headers=headers)
                assert status == 401 and data["error"]["type"] == "authentication_error"
            status, _ = await post(session, h, "/v1/completions", req,
                                   headers={"Authorization": "Bearer secret"})
            assert status == 200
            async with session.get(h.base_url + "/health") as resp:
                assert resp.status == 200  # probes need no key
            async with session.get(h.base_url + "/metrics") as resp:
                assert resp.status == 200  # nor does Prometheus
            client = openai.AsyncOpenAI(base_url=h.base_url + "/v1", api_key="secret")
            assert (await client.completions.create(model="tiny", prompt="x", max_tokens=2)).id
            await client.close()

    arun(body())


def test_health_follows_the_scheduler_view_and_bypass(model_dir):
    async def body():
        async with running(model_dir, scheduler_alive=False, bypass_after_s=0.2) as h, \
                aiohttp.ClientSession() as session:
            async with session.get(h.base_url + "/health") as resp:
                assert resp.status == 503
                assert "no instance view" in (await resp.json())["reason"]
            h.cluster.alive = True
            await wait_until(lambda: h.gateway.routes.view is not None)
            async with session.get(h.base_url + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            h.cluster.alive = False
            await wait_until(lambda: h.gateway.routes.bypass)
            async with session.get(h.base_url + "/health") as resp:
                assert resp.status == 200 and "bypass" in (await resp.json())["reason"]

    arun(body())


def test_metrics(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            h.worker.behaviour.chunk_size = 1
            for _ in range(3):
                await post(session, h, "/v1/completions", {"prompt": [1, 2], "max_tokens": 4})
            await post(session, h, "/v1/completions", {"prompt": "x", "n": 0})
            async with session.get(h.base_url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                       for line in text.splitlines() if line and not line.startswith("#")}
            # vLLM's names under ferry:, labelled with the model and the instance that
            # delivered the first token; the gateway's own under ferry:gateway_*
            w0 = 'instance_id="w0",model_name="tiny"'
            assert samples[f'ferry:request_success_total{{finished_reason="length",{w0}}}'] == 3
            assert samples[f"ferry:prompt_tokens_total{{{w0}}}"] == 6
            assert samples[f"ferry:generation_tokens_total{{{w0}}}"] == 12
            assert samples[f"ferry:time_to_first_token_seconds_count{{{w0}}}"] == 3
            assert samples[f"ferry:inter_token_latency_seconds_count{{{w0}}}"] == 9
            assert samples[f"ferry:e2e_request_latency_seconds_count{{{w0}}}"] == 3
            assert samples['ferry:gateway_rejected_total{code="400"}'] == 1
            assert samples["ferry:gateway_inflight_requests"] == 0
            assert samples["ferry:gateway_bypass_mode"] == 0
            assert samples["ferry:gateway_replays_total"] == 0
            assert not [name for name in samples if name.startswith("ferry_")]

    arun(body())


# ---- input hygiene: size, Unicode, nesting, the pool, idle connections ----------------------


PROSE = "the quick brown fox jumps over the lazy dog, hello world! "


def unbounded_model_dir(path):
    """The test model with an added token that swallows the spaces before it (lstrip), so
    no characters-per-token bound holds: every prompt must be tokenized to be judged."""
    root = make_model_dir(path)
    spec = json.loads((root / "tokenizer.json").read_text())
    spec["added_tokens"][0]["lstrip"] = True
    (root / "tokenizer.json").write_text(json.dumps(spec))
    return root


async def probe_latencies(session, h, stop: asyncio.Event, busy: list | None = None) -> list[float]:
    """Small completions one after another until `stop`; each one's latency. `busy` gets
    one entry per completion made while the gateway's pool had a request in it."""
    times = []
    while not stop.is_set():
        start = time.perf_counter()
        status, data = await post(session, h, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200, data
        times.append(time.perf_counter() - start)
        if busy is not None and h.gateway.num_tokenizing:
            busy.append(times[-1])
        await asyncio.sleep(0.01)
    return times


async def post_raw(session, h, data, path="/v1/completions"):
    async with session.post(h.base_url + path, data=data,
                            headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


def test_a_10mb_prompt_is_refused_at_once_while_small_requests_are_served(model_dir):
    huge = json.dumps({"prompt": PROSE * (10_000_000 // len(PROSE))}).encode()

    async def chunked():  # no Content-Length: refused once the bound is read
        for i in range(0, len(huge), 1 << 20):
            yield huge[i:i + (1 << 20)]

    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            assert h.gateway.http.max_body_bytes < len(huge) // 4
            stop = asyncio.Event()
            probe = asyncio.ensure_future(probe_latencies(session, h, stop))
            await asyncio.sleep(0.05)
            results = await asyncio.gather(
                *[post_raw(session, h, huge) for _ in range(3)], post_raw(session, h, chunked()))
            await asyncio.sleep(0.05)
            stop.set()
            latencies = await probe
            for status, data in results:
                assert status == 413 and "Too Large" in data["error"]["message"]
                assert data["error"]["type"] == "invalid_request_error"
            assert latencies and max(latencies) < 2.0, latencies  # the old code: ~10 s
            await h.wait_idle()

    arun(body())


def test_prompt_text_longer_than_any_tokenization_fits_is_400_untokenized(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            text = h.gateway.text
            calls = []
            encode = text.encode
            text.encode = lambda s, **kw: calls.append(len(s)) or encode(s, **kw)
            limit = text.max_prompt_chars
            status, data = await post(session, h, "/v1/completions",
                                      {"prompt": "y" * (limit + 1), "max_tokens": 2})
            assert status == 400 and "maximum context length is 256" in data["error"]["message"]
            assert f"the prompt has {limit + 1} characters" in data["error"]["message"]
            big = "z" * 40_000  # a large body: parsed in the pool, refused there
            status, data = await post(session, h, "/v1/chat/completions",
                                      {"messages": [{"role": "user", "content": big}]})
            assert status == 400 and "maximum context length" in data["error"]["message"]
            assert calls == []
            status, _ = await post(session, h, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert status == 200 and calls == [2]

    arun(body())


SURROGATES = [
    ("/v1/completions", b'{"prompt": "hi \\ud800 there"}', "prompt is not valid Unicode"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
     "messages[0].content is not valid Unicode"),
    ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}',
     "messages[0].role is not valid Unicode"),
    ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800"}', "stop is not valid Unicode"),
    ("/v1/completions", b'{"prompt": [1, 2], "model": "\\ud800"}', "model is not valid Unicode"),
    # large bodies, parsed in the pool
    ("/v1/completions", b'{"prompt": "' + b"a" * 40_000 + b'\\ud800"}', "prompt is not valid"),
    ("/v1/completions", b'{"prompt": [' + b"1," * 60_000 + b'1], "stop": ["\\ud800"]}',
     "stop[0] is not valid Unicode"),
]


def test_lone_surrogates_are_400_naming_the_field(model_dir):
    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            for path, raw, match in SURROGATES:
                status, data = await post_raw(session, h, raw, path)
                assert status == 400 and match in data["error"]["message"], (raw[:60], data)
            status, _ = await post(session, h, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert status == 200
            assert h.gateway.metrics.render().count(b'rejected_total{code="500"}') == 0

    arun(body())


def test_deep_nesting_is_400(model_dir):
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        b'{"prompt": "hi", "x": ' + b"[" * 64 + b"]" * 64 + b"}",  # 65 levels, a small body
        b'{"prompt": "hi", "x": ' + deep + b"}",  # RecursionError in the C parser (pool)
        b'{"prompt": [' + b"1," * 60_000 + b'1], "x": ' + deep + b"}",  # the Python scanner
        deep,
    ]

    async def body():
        async with running(model_dir) as h, aiohttp.ClientSession() as session:
            for raw in cases:
                status, data = await post_raw(session, h, raw)
                assert status == 400 and "nested too deeply" in data["error"]["message"]
            messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
            status, _ = await post(session, h, "/v1/chat/completions",
                                   {"messages": messages, "max_tokens": 2})  # 4 levels: fine
            assert status == 200

    arun(body())


def test_the_tokenizer_pool_is_bounded_and_429s_past_its_queue(tmp_path):
    gate = threading.Event()

    async def body():
        async with running(unbounded_model_dir(tmp_path / "m"), num_tokenizer_threads=1,
                           max_tokenizer_queue=1) as h, aiohttp.ClientSession() as session:
            text = h.gateway.text
            assert text.max_prompt_chars is None
            encode = text.encode

            def slow_encode(s, **kwargs):
                if len(s) > 1000:
                    gate.wait(10)
                    return [5] * 10
                return encode(s, **kwargs)

            text.encode = slow_encode
            long = {"prompt": "w" * 40_000, "max_tokens": 2}
            first = asyncio.ensure_future(post(session, h, "/v1/completions", long))
            second = asyncio.ensure_future(post(session, h, "/v1/completions", long))
            await wait_until(lambda: h.gateway.pool.num_jobs == 2)
            status, data = await post(session, h, "/v1/completions", long)
            assert status == 429 and "overloaded" in data["error"]["message"]
            status, _ = await post(session, h, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert status == 200  # short requests never wait for the pool
            gate.set()
            assert [s for s, _ in await asyncio.gather(first, second)] == [200, 200]
            assert h.gateway.pool.num_jobs == 0 and h.gateway.num_tokenizing == 0

    try:
        arun(body())
    finally:
        gate.set()


def test_a_long_prompt_is_tokenized_while_small_requests_are_served(tmp_path):
    """No bound refuses it (the model has none): it is tokenized, in the pool, with the
    GIL released, and found too long. The old code held the loop for all of it."""
    prompt = PROSE * (2_000_000 // len(PROSE))  # ~2 s of tokenizing

    async def body():
        async with running(unbounded_model_dir(tmp_path / "m")) as h, \
                aiohttp.ClientSession() as session:
            stop, busy = asyncio.Event(), []
            probe = asyncio.ensure_future(probe_latencies(session, h, stop, busy))
            status, data = await post(session, h, "/v1/completions", {"prompt": prompt})
            stop.set()
            latencies = await probe
            assert status == 400 and "maximum context length" in data["error"]["message"]
            assert len(busy) >= 5, busy  # the old code served none while it tokenized
            assert max(latencies) < 2.0, latencies

    arun(body())


async def read_until_closed(reader, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout_s)


def test_idle_and_stalled_connections_are_closed(model_dir):
    async def body():
        async with running(model_dir, http_idle_timeout_s=0.3) as h:
            port = h.gateway.http.port

            async def connect():
                return await asyncio.open_connection("127.0.0.1", port)

            silent = await connect()
            headers_only = await connect()
            headers_only[1].write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            stalled_body = await connect()
            stalled_body[1].write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 100\r\n"
                                  b"\r\n{\"prompt\": ")
            keep_alive = await connect()
            keep_alive[1].write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            start = time.monotonic()
            assert await read_until_closed(silent[0]) == b""
            assert await read_until_closed(headers_only[0]) == b""
            answer = await read_until_closed(stalled_body[0])
            assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer
            answer = await read_until_closed(keep_alive[0])
            assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
            assert time.monotonic() - start < 4.0
            for _, writer in (silent, headers_only, stalled_body, keep_alive):
                writer.close()
            await wait_until(lambda: not h.gateway.http.runner.server.connections)
            # A request that takes longer than the idle timeout is not cut off.
            h.worker.behaviour.token_delay_s = 0.1
            async with aiohttp.ClientSession() as session:
                status, data = await post(session, h, "/v1/completions",
                                          {"prompt": "hi", "max_tokens": 8})
                assert status == 200 and data["usage"]["completion_tokens"] == 8

    arun(body())


def test_connections_past_the_bound_are_refused(model_dir):
    async def body():
        async with running(model_dir, max_http_connections=2) as h:
            port = h.gateway.http.port
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await wait_until(lambda: len(h.gateway.http.runner.server.connections) == 2)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await read_until_closed(reader)
            assert answer.startswith(b"HTTP/1.1 429")
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 429
            writer.close()
            held[0][1].close()
            await wait_until(lambda: len(h.gateway.http.runner.server.connections) == 1)
            async with aiohttp.ClientSession() as session:
                status, _ = await post(session, h, "/v1/completions",
                                       {"prompt": "hi", "max_tokens": 2})
                assert status == 200
            held[1][1].close()

    arun(body())
