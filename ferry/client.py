"""Ferry's client SDK: one DEALER connection to the gateway's SDK endpoint, many requests
multiplexed over it by client_req_id.

    async with AsyncClient("tcp://127.0.0.1:8001") as client:
        completion = await client.generate("Hello", max_tokens=32)
        async for chunk in client.stream("Hello", max_tokens=32):
            print(chunk.text, end="")

    with Client() as client:            # blocking; safe to share between threads
        print(client.generate(prompt_token_ids=[1, 2, 3], max_tokens=8).token_ids)

A stream that is closed early (break + garbage, `close()`, a cancelled task) aborts its
request on the gateway, which frees the worker's KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ferry.common import env, structured, wire
from ferry.common.codec import WireError
from ferry.common.sampling import SamplingParams, TokenLogprobs
from ferry.errors import (
    BadRequest,
    ConnectionLost,
    FerryError,
    Overloaded,
    ServerError,
    Timeout,
    Unavailable,
    error_from_reply,
)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0
# The client's own timer runs this much past the request's deadline, so the gateway's
# answer (a timeout chunk or a 504) normally arrives first.
CLIENT_GRACE_S = 1.0
# Chunks waiting for a slow stream consumer; past it, new chunks merge into the last one.
MAX_BUFFERED_CHUNKS = 256
REPLY_MESSAGES = (wire.TokenChunk, wire.ErrorReply)
RETRYABLE = (Overloaded, Unavailable)  # refused before running: safe to send again
MAX_READ_BATCH = 256  # replies routed per wake-up of the reader
# ZMTP heartbeats on the connection: a gateway that stops answering them (a dead host, a
# cut network) counts as disconnected after HEARTBEAT_TIMEOUT_MS; a killed process is
# seen at once (its socket closes). Requests in flight then fail with ConnectionLost.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


@dataclass(frozen=True, slots=True)
class Completion:
    req_id: str  # Ferry's request id
    token_ids: tuple[int, ...]  # output tokens
    text: str  # detokenized output, stop strings cut
    finish_reason: str  # "length" | "stop" | "abort"
    num_prompt_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when asked (logprobs=k)
    # Of num_prompt_tokens, those whose KV came from a prefix cache (not computed)
    num_cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    req_id: str
    first_index: int  # output index of token_ids[0]
    token_ids: tuple[int, ...]
    text: str  # text delta
    finish_reason: str | None  # None until the last chunk
    num_prompt_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when asked (logprobs=k)
    # Of num_prompt_tokens, those whose KV came from a prefix cache; 0 until known (it
    # comes with the first token)
    num_cached_prompt_tokens: int = 0


class _Replies:
    """Replies for one request, waiting for its reader: bounded, merging when full."""

    __slots__ = ("chunks", "error", "event")

    def __init__(self) -> None:
        self.chunks: deque[wire.TokenChunk] = deque()
        self.error: FerryError | None = None
        self.event = asyncio.Event()

    def fail(self, error: FerryError) -> None:
        self.error = error
        self.event.set()

    def put(self, msg: wire.TokenChunk | wire.ErrorReply) -> None:
        if isinstance(msg, wire.ErrorReply):
            self.error = error_from_reply(msg.code, msg.message)
        elif len(self.chunks) >= MAX_BUFFERED_CHUNKS:
            last = self.chunks.pop()
            self.chunks.append(wire.TokenChunk(
                client_req_id=last.client_req_id, req_id=last.req_id,
                first_index=last.first_index, token_ids=last.token_ids + msg.token_ids,
                text=last.text + msg.text, finish_reason=msg.finish_reason,
                num_prompt_tokens=msg.num_prompt_tokens, logprobs=last.logprobs + msg.logprobs,
                num_cached_prompt_tokens=msg.num_cached_prompt_tokens,
            ))
        else:
            self.chunks.append(msg)
        self.event.set()

    async def get(self) -> wire.TokenChunk:
        while not self.chunks and self.error is None:
            self.event.clear()
            await self.event.wait()
        if self.chunks:
            return self.chunks.popleft()
        raise self.error


class AsyncClient:
    """Client of one gateway (asyncio). `addr` defaults to FERRY_GATEWAY_ADDR, `api_key`
    to FERRY_API_KEY; `timeout_s` is the default deadline of each request. A request
    refused with Overloaded / Unavailable before any output is retried up to
    `max_retries` times, `retry_backoff_s` doubling each time, within its deadline.
    The connection opens on the first request, in the running loop."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 0,
        retry_backoff_s: float = 0.1,
    ) -> None:
        self.addr = addr or env.gateway_sdk_addr()
        self.api_key = api_key if api_key is not None else env.api_key()
        self.timeout_s = timeout_s  # default per-request deadline
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_frame_bytes = env.max_frame_bytes()
        self._ids = itertools.count()
        self._replies: dict[str, _Replies] = {}  # client_req_id -> its replies
        self._socket: zmq.asyncio.Socket | None = None  # made in the running loop
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None  # the connection's monitor

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reader = self._watcher = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        for replies in self._replies.values():
            replies.put(wire.ErrorReply(client_req_id=None, code=0, message="client closed"))

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Run one request to the end. Arguments as in `stream`."""
        stream = AsyncStream(self, *self._request(prompt, stream=False, **kwargs))
        try:
            chunk = await stream.next_reply()
        finally:
            stream.abort()  # no-op once finished
        return Completion(chunk.req_id, chunk.token_ids, chunk.text, chunk.finish_reason,
                          chunk.num_prompt_tokens, chunk.logprobs, chunk.num_cached_prompt_tokens)

    def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncStream:
        """A request's chunks as an async iterator; the request goes out on the first
        iteration. Arguments are checked here (BadRequest):

        prompt / prompt_token_ids (exactly one), max_tokens=16, temperature=1.0,
        top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=() (a string or strings),
        stop_token_ids=(), ignore_eos=False, min_tokens=0, presence_penalty=0.0,
        frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={token id: bias},
        logprobs=None (k: each token's logprob and the top k, in chunk.logprobs),
        include_stop_str_in_output=False, skip_special_tokens=True,
        priority="normal" | "high", timeout_s (client default); structured output, at
        most one of guided_json (a JSON schema, an object or its text), guided_regex,
        guided_choice (strings), guided_grammar (Lark or GBNF). Anything else is a
        BadRequest naming it."""
        return AsyncStream(self, *self._request(prompt, stream=True, **kwargs))

    def abort(self, client_req_id: str) -> None:
        """Ask the gateway to abort a request of this client (non-blocking)."""
        self._replies.pop(client_req_id, None)
        if self._socket is None:
            return
        future = self._socket.send_multipart(
            wire.encode(wire.CancelRequest(client_req_id=client_req_id, api_key=self.api_key)),
            flags=zmq.NOBLOCK,
        )
        future.add_done_callback(_ignore_result)  # best effort: the deadline cleans up anyway

    def _request(
        self,
        prompt: str | None,
        *,
        stream: bool,
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        priority: str | int = "normal",
        timeout_s: float | None = None,
        guided_json: dict[str, Any] | str | None = None,
        guided_regex: str | None = None,
        guided_choice: Sequence[str] | None = None,
        guided_grammar: str | None = None,
        **unknown: Any,
    ) -> tuple[str, list[bytes], float]:
        """(client_req_id, the GenerateRequest's frames, timeout_s), checked."""
        if unknown:
            raise BadRequest(f"unknown argument {sorted(unknown)[0]!r}: the SDK does not take "
                             f"it (see AsyncClient.stream for the arguments)")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            bias = dict(logit_bias or {})
            grammar_kind, grammar = structured.from_guided(
                guided_json=guided_json, guided_regex=guided_regex,
                guided_choice=guided_choice,
                guided_grammar=guided_grammar)
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                min_p=min_p, seed=seed, ignore_eos=ignore_eos,
                stop=(stop,) if isinstance(stop, str) else tuple(stop),
                stop_token_ids=tuple(stop_token_ids), min_tokens=min_tokens,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                repetition_penalty=repetition_penalty,
                logit_bias_token_ids=tuple(bias), logit_bias_values=tuple(bias.values()),
                logprobs=logprobs, include_stop_str_in_output=include_stop_str_in_output,
                skip_special_tokens=skip_special_tokens,
                grammar_kind=grammar_kind, grammar=grammar,
            )
            sampling.validate()
            priority_value = int(wire.Priority.parse(priority))
        except (TypeError, ValueError) as err:
            raise BadRequest(str(err)) from None
        if (prompt is None) == (prompt_token_ids is None):
            raise BadRequest("give exactly one of prompt and prompt_token_ids")
        client_req_id = str(next(self._ids))
        frames = wire.encode(wire.GenerateRequest(
            client_req_id=client_req_id,
            prompt=prompt,
            prompt_token_ids=None if prompt_token_ids is None else tuple(prompt_token_ids),
            sampling=sampling,
            priority=priority_value,
            stream=stream,
            timeout_s=timeout_s,
            api_key=self.api_key,
        ))
        if len(frames[1]) > self.max_frame_bytes:
            raise BadRequest(f"request of {len(frames[1])} bytes exceeds {self.max_frame_bytes}",
                             code=413)
        return client_req_id, frames, timeout_s

    async def _send(self, client_req_id: str, frames: list[bytes]) -> _Replies:
        """Send a request; its replies collect in the returned buffer."""
        socket = self._connect()
        self._replies[client_req_id] = replies = _Replies()
        try:
            await socket.send_multipart(frames)
        except BaseException:
            self._replies.pop(client_req_id, None)
            raise
        return replies

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._socket.connect(self.addr)
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read())
            self._watcher = loop.create_task(self._watch(monitor))
        return self._socket

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Fail the requests in flight when the connection to the gateway breaks (they
        are lost with it); the socket reconnects by itself for the next ones."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    lost, self._replies = self._replies, {}
                    for replies in lost.values():
                        replies.fail(ConnectionLost(f"lost the connection to the gateway at "
                                                    f"{self.addr} with the request in flight"))
        finally:
            monitor.close(linger=0)

    async def _read(self) -> None:
        """Route every reply to its request; replies of finished requests are dropped.
        Awaits one reply, then takes what else is queued without waiting (cheaper)."""
        socket = self._socket
        # A synchronous view of the socket, used only right after an awaited receive; the
        # next awaited receive tries the socket before waiting on its descriptor.
        drain = zmq.Socket.shadow(socket.underlying)
        while True:
            self._route(await socket.recv_multipart())
            for _ in range(MAX_READ_BATCH):
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._route(frames)
            await asyncio.sleep(0)

    def _route(self, frames: list[bytes]) -> None:
        try:
            msg = wire.decode(frames, REPLY_MESSAGES, self.max_frame_bytes)
        except WireError:
            return  # a gateway speaking another protocol: the request times out
        replies = self._replies.get(msg.client_req_id)
        if replies is not None:
            replies.put(msg)


class AsyncStream:
    """The chunks of one request. Closing it (or dropping it, or cancelling the task that
    reads it) before the end aborts the request."""

    def __init__(self, client: AsyncClient, client_req_id: str, frames: list[bytes],
                 timeout_s: float) -> None:
        self.client = client
        self.client_req_id = client_req_id
        self.req_id: str | None = None  # known from the first chunk
        self._request = frames  # the GenerateRequest, kept for retries
        self._frames: list[bytes] | None = frames  # until sent
        self._timeout_s = timeout_s
        self._replies: _Replies | None = None
        self._deadline = 0.0  # loop time, set when first sent
        self._num_retries = 0
        self._num_received = 0
        self._done = False
        self._timed_out = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._timed_out:  # the last chunk said "timeout"; it was yielded, now raise
            self._timed_out = False
            raise Timeout("request timed out")
        if self._done:
            raise StopAsyncIteration
        msg = await self.next_reply()
        if msg.first_index != self._num_received:
            self.abort()
            raise ServerError(f"chunk at index {msg.first_index}, expected {self._num_received}")
        self._num_received += len(msg.token_ids)
        if msg.finish_reason == "timeout":
            self._timed_out = True
        return Chunk(msg.req_id, msg.first_index, msg.token_ids, msg.text, msg.finish_reason,
                     msg.num_prompt_tokens, msg.logprobs, msg.num_cached_prompt_tokens)

    async def start(self) -> None:
        """Send the request now (iterating does it otherwise); idempotent."""
        if self._frames is not None:
            frames, self._frames = self._frames, None
            if not self._deadline:
                loop_time = asyncio.get_running_loop().time()
                self._deadline = loop_time + self._timeout_s + CLIENT_GRACE_S
            self._replies = await self.client._send(self.client_req_id, frames)

    async def next_reply(self) -> wire.TokenChunk:
        """The next TokenChunk (sending the request first if need be); raises the
        request's error, or Timeout past the deadline. A request refused as overloaded or
        unavailable before any output is sent again, up to the client's max_retries."""
        while True:
            await self.start()
            remaining = self._deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    msg = await self._replies.get()
                break
            except RETRYABLE as err:  # the gateway has ended this attempt
                self.client._replies.pop(self.client_req_id, None)
                if self._num_received or self._num_retries >= self.client.max_retries:
                    self._done = True
                    raise
                self._num_retries += 1
                delay = self.client.retry_backoff_s * 2 ** (self._num_retries - 1)
                if asyncio.get_running_loop().time() + delay >= self._deadline:
                    self._done = True
                    raise err from None
                await asyncio.sleep(delay)
                self._frames = self._request
            except FerryError:  # another error reply: the gateway has ended the request
                self._finish()
                raise
            except TimeoutError:
                self.abort()
                raise Timeout("no answer from the gateway before the deadline", code=0) from None
            except BaseException:  # the consumer was cancelled
                self.abort()
                raise
        self.req_id = msg.req_id
        if msg.finish_reason is not None:
            self._finish()
        return msg

    def abort(self) -> None:
        """Abort the request unless it has finished (non-blocking, idempotent)."""
        if self._done:
            return
        self._done = True
        if self._frames is None:  # sent: tell the gateway
            self.client.abort(self.client_req_id)
        self._frames = None

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()

    def _finish(self) -> None:
        self.client._replies.pop(self.client_req_id, None)
        self._done = True

    def __del__(self) -> None:
        if not self._done and self._frames is None and self.client._socket is not None:
            try:
                self.client.abort(self.client_req_id)
            except Exception:  # the loop or socket is gone: nothing left to abort
                pass


class Client:
    """Blocking client: an AsyncClient on a background event-loop thread. Methods may be
    called from many threads at once."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 0,
        retry_backoff_s: float = 0.1,
    ) -> None:
        self._async = AsyncClient(addr, api_key=api_key, timeout_s=timeout_s,
                                  max_retries=max_retries, retry_backoff_s=retry_backoff_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ferry-client",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """As AsyncClient.generate."""
        return self._call(self._async.generate(prompt, **kwargs))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Stream:
        """As AsyncClient.stream; iterate the result. Close it (or leave the loop and drop
        it) to abort the request early."""
        return Stream(self, self._async.stream(prompt, **kwargs))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt too: cancel it in the loop
            future.cancel()
            raise


class Stream:
    """Blocking iterator over one request's chunks."""

    def __init__(self, client: Client, stream: AsyncStream) -> None:
        self._client = client
        self._stream = stream

    @property
    def client_req_id(self) -> str:
        return self._stream.client_req_id

    @property
    def req_id(self) -> str | None:
        return self._stream.req_id

    def start(self) -> None:
        """Send the request now (iterating does it otherwise); idempotent."""
        self._client._call(self._stream.start())

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._client._call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Abort the request unless it has finished."""
        loop = self._client._loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._stream.abort)

    abort = close

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
