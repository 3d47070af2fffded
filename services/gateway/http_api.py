"""The OpenAI-compatible HTTP API (aiohttp, on the gateway's loop):

    POST /v1/completions, /v1/chat/completions   stream (SSE, `data: [DONE]`) or not
    POST /tokenize, /detokenize                  vLLM's shapes
    GET  /v1/models, /version, /health (readiness), /live (liveness), /metrics

An API key, when the gateway has any, is needed for /v1/* and /tokenize, /detokenize.

Errors are OpenAI-shaped JSON, {"error": {"message", "type", "code"}}, with the HTTP
status. A client that disconnects aborts its request (the handler is cancelled).

Input hygiene (DESIGN §7): a body longer than any request that could fit the model is
refused (413) before it is read whole; bodies over LONG_BODY_BYTES are parsed (and their
prompts tokenized) in the gateway's bounded pool, never on the loop; a connection silent
for http_idle_timeout_s (before its first request, between requests, mid-headers or
mid-body) is closed; past max_http_connections a new connection gets 429 and is closed."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
from collections import deque
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ferry.common.logging import get_logger
from ferry.common.text import TextModel
from ferry.services.gateway import openai_protocol as oai
from ferry.services.gateway.frontend import GatewayApi
from ferry.services.gateway.requests import Delta, Rejected
from ferry.services.gateway.tool_calls import ToolCallStream, parse_tool_call, tool_call

log = get_logger()
T = TypeVar("T")
try:
    _VERSION = package_version("ferry-serve")
except PackageNotFoundError:  # a checkout used without installing
    _VERSION = "unknown"

LONG_BODY_BYTES = 32_768  # larger bodies are parsed and tokenized in the pool, off the loop
# A body's bound, from the longest prompt that could fit (TextModel.max_prompt_chars):
JSON_BYTES_PER_CHAR = 12  # the most one prompt character takes in JSON ("\ud83d\ude00")
BYTES_PER_CONTEXT_TOKEN = 64  # a token id ("123456, "), or a short chat message, per token
BODY_SLACK_BYTES = 1 << 20  # every other field (stop strings, options)
_KEYED_PATHS = frozenset({"/tokenize", "/detokenize"})  # besides /v1/*: they cost CPU


def max_body_bytes(text: TextModel, max_frame_bytes: int) -> int:
    """The largest HTTP body worth reading: what the longest prompt that could fit takes
    in JSON, plus room for the rest; never more than max_frame_bytes."""
    if text.max_prompt_chars is None:
        return max_frame_bytes
    bound = (JSON_BYTES_PER_CHAR * text.max_prompt_chars
             + BYTES_PER_CONTEXT_TOKEN * text.max_model_len + BODY_SLACK_BYTES)
    return min(max_frame_bytes, bound)


def _too_many_connections(limit: int) -> bytes:
    """A whole HTTP/1.1 429 response that closes its connection (sent without aiohttp)."""
    body = json.dumps(oai.error_body(429, f"overloaded: {limit} HTTP connections open")).encode()
    return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body


class _Refuse(asyncio.Protocol):
    """A connection past max_http_connections: one canned answer, then closed."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.response)  # type: ignore[attr-defined]
        transport.close()


class HttpSink:
    """One request's output (one choice of an HTTP request): at most `max_chunks` deltas
    wait for the handler; past that a new delta merges into the last one, so a slow reader
    gets fewer, larger pieces and the buffer stays bounded. The choices of one HTTP request
    share `event`."""

    __slots__ = ("max_chunks", "deltas", "error", "event", "alive")

    def __init__(self, max_chunks: int, event: asyncio.Event | None = None) -> None:
        self.max_chunks = max_chunks
        self.deltas: deque[Delta] = deque()
        self.error: oai.ApiError | None = None
        self.event = event or asyncio.Event()
        self.alive = True  # False once the handler has gone

    def push(self, delta: Delta) -> bool:
        if len(self.deltas) >= self.max_chunks:
            last = self.deltas.pop()
            delta = Delta(
                last.req, last.first_index, last.token_ids + delta.token_ids,
                last.text + delta.text, delta.finish_reason, delta.release,
                last.logprobs + delta.logprobs,
            )
        self.deltas.append(delta)
        self.event.set()
        return self.alive

    def fail(self, code: int, message: str) -> None:
        self.error = oai.ApiError(code, message)
        self.event.set()

    def take(self) -> list[Delta]:
        """Every delta since the last call (maybe none); raises the request's error once
        they are taken."""
        if self.deltas:
            out = list(self.deltas)
            self.deltas.clear()
            return out
        if self.error is not None:
            raise self.error
        return []


class HttpApi:
    def __init__(self, gateway: GatewayApi) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.api_keys = tuple(key.encode() for key in self.config.api_keys)
        self.max_body_bytes = max_body_bytes(gateway.text, self.config.max_frame_bytes)
        self.app = web.Application(
            middlewares=[self.errors_as_json], client_max_size=self.max_body_bytes
        )
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/detokenize", self.detokenize)
        self.app.router.add_get("/version", self.version)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/live", self.live)
        self.app.router.add_get("/metrics", self.metrics)
        # aiohttp's keep-alive timer closes a connection that has had no request for
        # this long: from its start (nothing sent, or headers never finished) and after
        # each response. A stalled body is read_body's to time out.
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                    keepalive_timeout=self.config.http_idle_timeout_s)
        self.listener: asyncio.Server | None = None
        self.port = self.config.http_port  # the bound port once started (for port 0)

    async def start(self) -> None:
        await self.runner.setup()
        self.listener = await asyncio.get_running_loop().create_server(
            self.accept, self.config.http_host, self.config.http_port, backlog=1024)
        self.port = self.listener.sockets[0].getsockname()[1]

    def accept(self) -> asyncio.Protocol:
        """A new connection's protocol: aiohttp's, or a refusal past max_http_connections."""
        server, limit = self.runner.server, self.config.max_http_connections
        assert server is not None  # set up before the listener opens
        if len(server.connections) < limit:
            return server()
        self.gateway.metrics.error(429)
        return _Refuse(_too_many_connections(limit))

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await self.runner.cleanup()

    @web.middleware
    async def errors_as_json(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/") or request.path in _KEYED_PATHS:
                self.check_auth(request)
            return await handler(request)
        except oai.ApiError as err:
            response = self.error_response(err.status, err.message)
            if err.status == 408:  # the body stalled: answer, then hang up at once
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
                if request.transport is not None:
                    request.transport.close()
            return response
        except Rejected as err:
            return self.error_response(err.code, err.message)
        except web.HTTPException as err:  # unknown route, wrong method, body too large
            if err.status < 400:
                raise
            return self.error_response(err.status, err.reason)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("http_handler_failed", path=request.path)
            return self.error_response(500, "internal error")

    def error_response(self, status: int, message: str) -> web.Response:
        self.gateway.metrics.error(status)
        return web.json_response(oai.error_body(status, message), status=status)

    def check_auth(self, request: web.Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self.api_keys):
            raise oai.ApiError(401, "missing or invalid api key (Authorization: Bearer ...)")

    # ---- routes -----------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        sub = await self.parse(request, functools.partial(
            oai.parse_completion, text=self.gateway.text, model_name=self.config.model_name))
        return await self.generate(request, sub, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        sub = await self.parse(request, functools.partial(
            oai.parse_chat, text=self.gateway.text, model_name=self.config.model_name,
            max_tokens_limit=self.config.max_tokens_limit))
        return await self.generate(request, sub, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({
            "object": "list",
            "data": [{
                "id": self.config.model_name, "object": "model", "created": 0,
                "owned_by": "ferry", "max_model_len": self.gateway.text.max_model_len,
            }],
        })

    async def tokenize(self, request: web.Request) -> web.Response:
        return web.json_response(await self.parse(request, functools.partial(
            oai.tokenize, text=self.gateway.text, model_name=self.config.model_name)))

    async def detokenize(self, request: web.Request) -> web.Response:
        return web.json_response(await self.parse(request, functools.partial(
            oai.detokenize, text=self.gateway.text, model_name=self.config.model_name)))

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _VERSION})

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the gateway's event loop answers. Restart it if this fails."""
        return web.json_response({"status": "ok"})

    async def health(self, request: web.Request) -> web.Response:
        """Readiness: 200 while some instance can take a request, else 503 with the reason
        (before the workers register, after the last one left). Route traffic on this."""
        ok, reason = self.gateway.health()
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "reason": reason}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # ---- generation -------------------------------------------------------------------

    async def parse(self, request: web.Request, parse: Callable[[Any], T]) -> T:
        """The body through `parse` (to a Submission, a tokenize answer...); a large one
        (parsing and tokenizing take long) in the pool. Raises ApiError or Rejected."""
        raw = await self.read_body(request)
        if len(raw) > LONG_BODY_BYTES:
            return await self.gateway.tokenize_off_loop(_decode_and_parse, raw, parse)
        return _decode_and_parse(raw, parse)

    async def read_body(self, request: web.Request) -> bytes:
        """The whole body: 413 past max_body_bytes (at once when Content-Length says so),
        408 when the client sends nothing for http_idle_timeout_s mid-body."""
        limit, idle_s = self.max_body_bytes, self.config.http_idle_timeout_s
        too_large = f"the request body is too large (Request Entity Too Large): over {limit} bytes"
        if request.content_length is not None and request.content_length > limit:
            raise oai.ApiError(413, too_large)
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise oai.ApiError(408, f"the request body stalled: nothing for {idle_s} s") \
                    from None
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise oai.ApiError(413, too_large)
            chunks.append(chunk)

    async def generate(self, request: web.Request, sub: oai.Submission, *, chat: bool):
        """Run the request's n choices (each its own request) and answer with all of them."""
        event = asyncio.Event()
        reqs = []
        try:
            for index in range(sub.n):
                sink = HttpSink(self.config.max_queued_chunks, event)
                reqs.append((self.gateway.submit(
                    sub.prompt_token_ids, sub.sampling_of(index), priority=sub.priority,
                    timeout_s=sub.timeout_s, stream=sub.stream, sink=sink,
                ), sink))
        except Rejected as err:
            for req, _ in reqs:
                self.gateway.abort(req.req_id)
            raise oai.ApiError(err.code, err.message) from None
        reply = Reply(reqs[0][0].req_id, int(reqs[0][0].arrival_s), self.config.model_name,
                      len(sub.prompt_token_ids), sub, self.gateway.text, chat=chat)
        reply.choices = [Choice(i, req.req_id, sink, _tool_stream(sub, req.req_id))
                         for i, (req, sink) in enumerate(reqs)]
        try:
            if sub.stream:
                return await self.stream(request, reply, event)
            return await self.collect(reply, event)
        finally:
            for choice in reply.choices:
                choice.sink.alive = False
                if choice.finish_reason is None:  # client gone, cancelled, or failed
                    self.gateway.abort(choice.req_id)

    async def collect(self, reply: Reply, event: asyncio.Event) -> web.Response:
        while not reply.done:
            try:
                batch = await reply.next(event)
            except oai.ApiError:
                reply.failed()
                raise
            for choice, delta in batch:
                choice.texts.append(delta.text)
                choice.token_ids += delta.token_ids
                choice.logprobs += delta.logprobs
                choice.add(delta)
            if any(c.finish_reason == "timeout" for c in reply.choices):
                raise oai.ApiError(504, "request timed out")
        choices = [reply.whole_choice(c) for c in reply.choices]
        return web.json_response(oai.completion_response(
            reply.req_id, reply.created, reply.model, choices, reply.usage(), chat=reply.chat,
        ))

    async def stream(self, request: web.Request, reply: Reply,
                     event: asyncio.Event) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Request-Id": reply.req_id,
        })
        await response.prepare(request)
        for choice in reply.choices:  # the chat opener, or the echoed prompt
            if reply.chat:
                await _send_event(response, reply.chunk(choice, "", (), (), None, role=True))
            elif reply.sub.echo is not None:
                await _send_event(response, reply.chunk(choice, reply.sub.echo, (), (), None))
        while not reply.done:
            try:
                batch = await reply.next(event)
            except oai.ApiError as err:
                reply.failed()
                self.gateway.metrics.error(err.status)
                await _send_event(response, oai.error_body(err.status, err.message))
                break
            timed_out = False
            for choice, deltas in _by_choice(batch):
                for delta in deltas:
                    choice.add(delta)
                text = "".join(d.text for d in deltas)
                token_ids = [t for d in deltas for t in d.token_ids]
                logprobs = [lp for d in deltas for lp in d.logprobs]
                calls: list[dict[str, Any]] = []
                finish_reason = choice.finish_reason
                if choice.tools is not None and finish_reason != "timeout":
                    text, calls = choice.tools.feed(text)
                    if finish_reason is not None:
                        more_text, more_calls = choice.tools.finish()
                        text, calls = text + more_text, calls + more_calls
                        if choice.tools.called and finish_reason == "stop":
                            finish_reason = "tool_calls"
                if finish_reason == "timeout":
                    if text or token_ids:
                        await _send_event(response, reply.chunk(choice, text, token_ids,
                                                                logprobs, None))
                    timed_out = True
                elif text or calls or finish_reason is not None or token_ids and (
                        reply.sub.sampling.logprobs is not None or reply.sub.continuous_usage):
                    await _send_event(response, reply.chunk(choice, text, token_ids, logprobs,
                                                            finish_reason, tool_calls=calls))
            if timed_out:
                reply.failed()
                self.gateway.metrics.error(504)
                await _send_event(response, oai.error_body(504, "request timed out"))
                break
        if reply.sub.include_usage and not reply.error:
            await _send_event(response, oai.usage_chunk(
                reply.req_id, reply.created, reply.model, reply.usage(), chat=reply.chat))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class Choice:
    """What one choice (one request) of an HTTP request has produced so far."""

    __slots__ = ("index", "req_id", "sink", "num_output_tokens", "num_cached_prompt_tokens",
                 "finish_reason", "texts", "token_ids", "logprobs", "text_offset", "tools")

    def __init__(self, index: int, req_id: str, sink: HttpSink,
                 tools: ToolCallStream | None = None) -> None:
        self.index = index
        self.req_id = req_id
        self.sink = sink
        self.tools = tools  # stream: its answer read as a tool call (chat with tools)
        self.num_output_tokens = 0
        self.num_cached_prompt_tokens = 0  # its request's, once a worker reported it
        self.finish_reason: str | None = None
        self.texts: list[str] = []  # non-stream: every delta's text
        self.token_ids: list[int] = []  # non-stream: every token (for logprobs)
        self.logprobs: list = []  # non-stream: their TokenLogprobs
        self.text_offset = 0  # completions logprobs: where the next token's text starts

    def add(self, delta: Delta) -> None:
        self.num_output_tokens += len(delta.token_ids)
        self.num_cached_prompt_tokens = delta.req.num_cached_prompt_tokens or 0
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class Reply:
    """What one HTTP request has produced so far: its choices, and how to shape them."""

    __slots__ = ("req_id", "created", "model", "num_prompt_tokens", "sub", "text", "chat",
                 "choices", "error")

    def __init__(self, req_id: str, created: int, model: str, num_prompt_tokens: int,
                 sub: oai.Submission, text: TextModel, *, chat: bool) -> None:
        self.req_id = req_id  # the first choice's (the response's id)
        self.created = created
        self.model = model
        self.num_prompt_tokens = num_prompt_tokens
        self.sub = sub
        self.text = text
        self.chat = chat
        self.choices: list[Choice] = []
        self.error = False

    @property
    def done(self) -> bool:
        return self.error or all(c.finish_reason is not None for c in self.choices)

    def failed(self) -> None:
        self.error = True

    async def next(self, event: asyncio.Event) -> list[tuple[Choice, Delta]]:
        """Every delta of every choice since the last call (waits for one); raises a
        choice's error."""
        while True:
            batch = [(c, d) for c in self.choices for d in c.sink.take()]
            if batch:
                return batch
            event.clear()
            await event.wait()

    def usage(self, choice: Choice | None = None) -> dict[str, Any]:
        """The prompt once, and the tokens of every choice (or of one). The n choices run
        one prompt as n requests: its cached tokens are the first choice's (or the one's)."""
        chosen = self.choices if choice is None else [choice]
        return oai.usage(self.num_prompt_tokens, sum(c.num_output_tokens for c in chosen),
                         chosen[0].num_cached_prompt_tokens)

    def logprobs(self, choice: Choice, token_ids, logprobs) -> dict[str, Any] | None:
        if self.sub.sampling.logprobs is None:
            return None
        if self.chat:
            return oai.chat_logprobs(self.text.token_strings, token_ids, logprobs)
        out, choice.text_offset = oai.completion_logprobs(
            self.text.token_strings, token_ids, logprobs, choice.text_offset)
        return out

    def whole_choice(self, choice: Choice) -> dict[str, Any]:
        text = "".join(choice.texts)
        if self.sub.echo is not None:
            text = self.sub.echo + text
        finish_reason, calls = choice.finish_reason, None
        call = None if self.sub.tools is None else parse_tool_call(text, self.sub.tools.names)
        if call is not None:
            calls = [tool_call(_call_id(choice.req_id), *call)]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return oai.choice(choice.index, text, finish_reason,
                          self.logprobs(choice, choice.token_ids, choice.logprobs),
                          chat=self.chat, stream=False, tool_calls=calls)

    def chunk(self, choice: Choice, text: str, token_ids, logprobs, finish_reason: str | None,
              *, role: bool = False, tool_calls: list[dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        content: str | None = text
        if self.chat and not text and not role:
            content = None  # a chat chunk with no new text carries no content field
        body = oai.choice(choice.index, content, finish_reason,
                          self.logprobs(choice, token_ids, logprobs) if token_ids else None,
                          chat=self.chat, stream=True, role=role, tool_calls=tool_calls)
        chunk = oai.stream_chunk(self.req_id, self.created, self.model, [body], chat=self.chat)
        if self.sub.continuous_usage:
            chunk["usage"] = self.usage(choice)
        return chunk


def _by_choice(batch: list[tuple[Choice, Delta]]) -> list[tuple[Choice, list[Delta]]]:
    """Consecutive deltas of one choice grouped (one chunk each), in arrival order."""
    out: list[tuple[Choice, list[Delta]]] = []
    for choice, delta in batch:
        if out and out[-1][0] is choice:
            out[-1][1].append(delta)
        else:
            out.append((choice, [delta]))
    return out


def _call_id(req_id: str) -> str:
    return f"call_{req_id}"


def _tool_stream(sub: oai.Submission, req_id: str) -> ToolCallStream | None:
    """A streamed chat answer's tool-call reader (None: no tools, or not streamed)."""
    if sub.tools is None or not sub.stream:
        return None
    return ToolCallStream(sub.tools.names, _call_id(req_id), forced=sub.tools.mode != "auto")


def _decode_and_parse(raw: bytes, parse: Callable[[Any], T]) -> T:
    return parse(oai.decode_body(raw))


async def _send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    await response.write(b"data: " + data + b"\n\n")
