"""The gateway's ROUTER for the ferry SDK: GenerateRequest / CancelRequest in, TokenChunk /
ErrorReply out. Many requests share one client connection; a request is known by
(connection identity, client_req_id).

Anything unreadable (malformed msgpack, unknown tag, wrong field types, a body over
max_frame_bytes) gets an ErrorReply and the loop goes on; a frame over the hard cap never
reaches Python (libzmq drops that connection)."""

from __future__ import annotations

import asyncio
import hmac

import msgpack
import zmq
import zmq.asyncio

from ferry.common import structured, wire
from ferry.common.codec import WireError
from ferry.common.logging import get_logger
from ferry.common.zmq_util import DEFAULT_HWM, hard_frame_cap
from ferry.services.gateway.frontend import GatewayApi
from ferry.services.gateway.recv import recv_batches
from ferry.services.gateway.requests import Delta, Rejected, Request, check_prompt_chars

log = get_logger()

CLIENT_MESSAGES = (wire.GenerateRequest, wire.CancelRequest)
PRIORITIES = frozenset(int(p) for p in wire.Priority)
LONG_PROMPT_CHARS = 32_768  # longer prompt text is tokenized in the gateway's pool, off the loop


class SdkFrontend:
    def __init__(self, gateway: GatewayApi, ctx: zmq.asyncio.Context) -> None:
        config = gateway.config
        self.gateway = gateway
        self.max_frame_bytes = config.max_frame_bytes
        self.api_keys = tuple(key.encode() for key in config.api_keys)
        # ROUTER both ways: requests come in, replies go out by client identity.
        self.recv_from_clients = ctx.socket(zmq.ROUTER)
        self.recv_from_clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer: an error
        self.recv_from_clients.setsockopt(zmq.SNDHWM, DEFAULT_HWM)
        self.recv_from_clients.setsockopt(zmq.RCVHWM, DEFAULT_HWM)
        self.recv_from_clients.setsockopt(zmq.LINGER, 0)
        self.recv_from_clients.setsockopt(zmq.MAXMSGSIZE, hard_frame_cap(config.max_frame_bytes))
        self.recv_from_clients.bind(config.sdk.bind)
        # (identity, client_req_id) -> req_id ("" while a long prompt is being tokenized)
        self.req_ids: dict[tuple[bytes, str], str] = {}
        self.tasks: set[asyncio.Task] = set()  # long-prompt tokenizations in progress
        self.handlers = {
            wire.GenerateRequest: self.handle_generate,
            wire.CancelRequest: self.handle_cancel,
        }

    async def serve(self) -> None:
        async for batch in recv_batches(self.recv_from_clients):
            for identity, *frames in batch:
                self.handle_frames(identity, frames)

    def handle_frames(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            msg = wire.decode(frames, CLIENT_MESSAGES, self.max_frame_bytes)
        except WireError as err:
            self.gateway.metrics.bad_client_messages.inc()
            log.warning("rejected_client_message", code=err.code, error=err.message)
            self.send_error(identity, _guess_client_req_id(frames), err.code, err.message)
            return
        if not self.authorized(msg.api_key):
            self.send_error(identity, msg.client_req_id, 401, "missing or invalid api key")
            return
        try:
            self.handlers[type(msg)](identity, msg)
        except Exception:
            log.exception("client_handler_failed", client_req_id=msg.client_req_id)
            self.send_error(identity, msg.client_req_id, 500, "internal error")

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.recv_from_clients.close(linger=0)

    def authorized(self, api_key: str | None) -> bool:
        if not self.api_keys:
            return True
        if api_key is None:
            return False
        given = api_key.encode()
        return any(hmac.compare_digest(given, key) for key in self.api_keys)

    # ---- handlers ---------------------------------------------------------------------

    def handle_generate(self, identity: bytes, msg: wire.GenerateRequest) -> None:
        key = (identity, msg.client_req_id)
        if key in self.req_ids:
            self.send_error(identity, msg.client_req_id, 400, "client_req_id already in flight")
            return
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            self.send_error(identity, msg.client_req_id, 400,
                            "give exactly one of prompt and prompt_token_ids")
            return
        if msg.prompt is None:
            self.start(identity, msg, msg.prompt_token_ids)
            return
        text = self.gateway.text
        try:  # refuse text that can never fit before tokenizing it
            check_prompt_chars(len(msg.prompt), max_model_len=text.max_model_len,
                               max_prompt_chars=text.max_prompt_chars)
        except Rejected as err:
            self.send_error(identity, msg.client_req_id, err.code, err.message)
            return
        if len(msg.prompt) <= LONG_PROMPT_CHARS:
            self.start(identity, msg, tuple(text.encode(msg.prompt)))
        else:
            self.req_ids[key] = ""  # reserved while the prompt is tokenized off the loop
            task = asyncio.get_running_loop().create_task(self.generate_long(identity, msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def generate_long(self, identity: bytes, msg: wire.GenerateRequest) -> None:
        key = (identity, msg.client_req_id)
        try:
            prompt_token_ids = await self.gateway.tokenize_off_loop(
                self.gateway.text.encode, msg.prompt)
        except Rejected as err:
            self.req_ids.pop(key, None)
            self.send_error(identity, msg.client_req_id, err.code, err.message)
            return
        if self.req_ids.pop(key, None) == "":  # not cancelled meanwhile
            self.start(identity, msg, tuple(prompt_token_ids))

    def start(self, identity: bytes, msg: wire.GenerateRequest,
              prompt_token_ids: tuple[int, ...]) -> None:
        """Submit a tokenized request; an ErrorReply when the gateway refuses it."""
        sink = SdkSink(self, identity, msg.client_req_id, msg.stream, len(prompt_token_ids))
        try:
            if msg.priority not in PRIORITIES:
                raise Rejected(400, f"unknown priority {msg.priority}")
            if msg.sampling.has_grammar:  # (HTTP checks its fields as it reads them)
                try:
                    structured.check(msg.sampling.grammar_kind, msg.sampling.grammar)
                except ValueError as err:
                    raise Rejected(400, str(err)) from None
            req = self.gateway.submit(
                prompt_token_ids, msg.sampling, priority=msg.priority, timeout_s=msg.timeout_s,
                stream=msg.stream, sink=sink,
            )
        except Rejected as err:
            self.send_error(identity, msg.client_req_id, err.code, err.message)
            return
        self.req_ids[(identity, msg.client_req_id)] = req.req_id

    def handle_cancel(self, identity: bytes, msg: wire.CancelRequest) -> None:
        key = (identity, msg.client_req_id)
        req_id = self.req_ids.get(key)
        if req_id == "":  # still tokenizing: it will not start
            del self.req_ids[key]
        elif req_id is not None:
            self.gateway.abort(req_id)

    # ---- replies ----------------------------------------------------------------------

    def send(self, identity: bytes, msg: object) -> bool:
        """Queue a reply without blocking; False when the client is gone or not reading
        (its queue is full)."""
        future = self.recv_from_clients.send_multipart(
            [identity, *wire.encode(msg)], flags=zmq.NOBLOCK
        )
        # pyzmq completes a NOBLOCK send at once when no other send waits (always so here:
        # this socket never sends blocking); an error is the future's exception.
        if not future.done():
            future.add_done_callback(_ignore_result)
            return True
        return future.exception() is None

    def send_error(self, identity: bytes, client_req_id: str | None, code: int, message: str):
        self.gateway.metrics.error(code)
        self.send(identity, wire.ErrorReply(client_req_id=client_req_id, code=code, message=message))

    def forget(self, identity: bytes, client_req_id: str) -> None:
        self.req_ids.pop((identity, client_req_id), None)


class SdkSink:
    """One SDK request's output: a TokenChunk per delta (stream), or one at the end."""

    __slots__ = ("frontend", "identity", "client_req_id", "stream", "num_prompt_tokens",
                 "token_ids", "texts", "logprobs", "alive")

    def __init__(self, frontend: SdkFrontend, identity: bytes, client_req_id: str,
                 stream: bool, num_prompt_tokens: int) -> None:
        self.frontend = frontend
        self.identity = identity
        self.client_req_id = client_req_id
        self.stream = stream
        self.num_prompt_tokens = num_prompt_tokens
        self.token_ids: list[int] = []  # non-stream: everything so far
        self.texts: list[str] = []
        self.logprobs: list = []  # non-stream: every token's TokenLogprobs (when asked)
        self.alive = True

    def push(self, delta: Delta) -> bool:
        finished = delta.finish_reason is not None
        if finished:
            self.frontend.forget(self.identity, self.client_req_id)
        if not self.alive:
            return False
        if self.stream:
            chunk = self._chunk(delta.req, delta.first_index, delta.token_ids, delta.text,
                                delta.finish_reason, delta.logprobs)
        else:
            self.token_ids.extend(delta.token_ids)
            self.texts.append(delta.text)
            self.logprobs.extend(delta.logprobs)
            if not finished:
                return True
            if delta.finish_reason == "timeout":
                self.fail(504, "request timed out")
                return True
            chunk = self._chunk(delta.req, 0, tuple(self.token_ids), "".join(self.texts),
                                delta.finish_reason, tuple(self.logprobs))
        self.alive = self.frontend.send(self.identity, chunk)
        return self.alive

    def fail(self, code: int, message: str) -> None:
        self.frontend.forget(self.identity, self.client_req_id)
        if self.alive:
            self.frontend.send_error(self.identity, self.client_req_id, code, message)
            self.alive = False

    def _chunk(self, req: Request, first_index, token_ids, text, finish_reason,
               logprobs) -> wire.TokenChunk:
        return wire.TokenChunk(
            client_req_id=self.client_req_id, req_id=req.req_id, first_index=first_index,
            token_ids=token_ids, text=text, finish_reason=finish_reason,
            num_prompt_tokens=self.num_prompt_tokens, logprobs=logprobs,
            num_cached_prompt_tokens=req.num_cached_prompt_tokens or 0,
        )


def _ignore_result(future) -> None:
    future.exception()


def _guess_client_req_id(frames: list[bytes]) -> str | None:
    """client_req_id of a message that failed to decode, when its body still starts like
    one (both client messages carry it first), so the client can match the error."""
    if len(frames) != 2:
        return None
    try:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(frames[1][:1024])
        if unpacker.read_array_header() < 1:
            return None
        value = unpacker.unpack()
    except Exception:  # any malformed prefix: no id
        return None
    return value if isinstance(value, str) else None
