"""ZMQ plumbing shared by every process: a bound PULL inbox that decodes strictly, PUSH
outboxes per peer address with bounded queues, and a small request/reply client.

Every queue is bounded: sockets carry a high-water mark, and a send that would block
raises Overloaded instead of buffering without limit.

With cluster keys (common/security.py) every socket here is CURVE: inboxes bind as
servers and check each message's sender against what its role may send; outboxes and
the request client connect with the process's own key. Without keys they are plain.
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio

from ferry.common import wire
from ferry.common.codec import WireError
from ferry.common.logging import get_logger
from ferry.common.security import KEYLESS, Allowed, ClusterKeys, Sender, refusal

# Messages a PUSH socket may queue for one peer before sends fail with Overloaded.
DEFAULT_HWM = 10_000

log = get_logger()


def hard_frame_cap(max_frame_bytes: int) -> int:
    return 4 * max_frame_bytes + 64


class Overloaded(Exception):
    """A bounded queue is full; the caller answers 'overloaded' (HTTP 429)."""


class BadAddress(ValueError):
    """No socket can connect to this address (decoding rejects such addresses; this is the
    last guard, for addresses from configuration)."""


def make_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context.instance()


def frames_and_sender(frames: list[zmq.Frame]) -> tuple[list[bytes], Sender]:
    """The bytes of a message received with copy=False, and who sent it (the User-Id the
    process's ZAP handler gave the connection)."""
    return [f.bytes for f in frames], Sender.from_user_id(frames[0].get("User-Id"))


class Inbox:
    """A bound PULL socket. `recv()` returns the next well-formed message that its sender
    may send here (`allowed`: message type -> roles); malformed or refused messages are
    logged and counted, never raised into the loop."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        bind: str,
        *,
        allowed: Allowed,
        max_frame_bytes: int,
        keys: ClusterKeys | None = None,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A hard cap well above the limit: libzmq drops the connection of a peer that sends
        # more, before the bytes reach Python. Between the limit and the cap, decode()
        # rejects the message with a logged 413 and the peer stays connected.
        self.socket.setsockopt(zmq.MAXMSGSIZE, hard_frame_cap(max_frame_bytes))
        if keys is not None:
            keys.server(self.socket)
        self.socket.bind(bind)
        self.allowed = allowed
        self.expected = tuple(allowed)
        self.keys = keys
        self.max_frame_bytes = max_frame_bytes
        self.num_rejected = 0  # malformed, or of a type this socket does not take
        self.num_refused = 0  # well formed, from a sender not allowed to send it

    async def recv(self) -> Any:
        return (await self.recv_raw())[1]

    async def recv_raw(self) -> tuple[list[bytes], Any]:
        """The next accepted message and its frames (for forwarding unread)."""
        while True:
            if self.keys is None:
                frames, sender = await self.socket.recv_multipart(copy=True), KEYLESS
            else:
                frames, sender = frames_and_sender(
                    await self.socket.recv_multipart(copy=False))
            msg = self.accept(frames, sender)
            if msg is not None:
                return frames, msg

    def accept(self, frames: list[bytes], sender: Sender) -> Any | None:
        """The decoded message, or None (logged, counted) if malformed or refused."""
        try:
            msg = wire.decode(frames, self.expected, self.max_frame_bytes)
        except WireError as err:
            self.num_rejected += 1
            log.warning("rejected_message", code=err.code, error=err.message)
            return None
        if self.keys is not None and (why := refusal(msg, sender, self.allowed)) is not None:
            self.num_refused += 1
            log.warning("sender_refused", reason=why)
            return None
        return msg

    def close(self) -> None:
        self.socket.close(linger=0)


class Outboxes:
    """PUSH sockets keyed by peer address, created on first use.

    The sockets are plain (blocking-API) ones on a shadow of the asyncio context: a
    non-blocking send on them raises zmq.Again at once, which we turn into Overloaded.
    (On an asyncio socket the error would land in a Future nobody awaits, and a full
    queue would drop messages silently.)"""

    def __init__(self, ctx: zmq.asyncio.Context, *, hwm: int = DEFAULT_HWM,
                 keys: ClusterKeys | None = None) -> None:
        self.ctx = zmq.Context.shadow(ctx.underlying)
        self.hwm = hwm
        self.keys = keys
        self._sockets: dict[str, zmq.Socket] = {}

    def _socket(self, addr: str) -> zmq.Socket:
        sock = self._sockets.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys is not None:
                self.keys.client(sock)
            try:
                sock.connect(addr)
            except zmq.ZMQError as err:
                sock.close(linger=0)
                raise BadAddress(f"cannot connect to {addr!r}: {err}") from None
            self._sockets[addr] = sock
        return sock

    def send(self, addr: str, msg: Any) -> None:
        self.send_frames(addr, wire.encode(msg))

    def send_frames(self, addr: str, frames: list[bytes]) -> None:
        """Queue frames for addr without blocking; Overloaded when the peer's queue is full,
        BadAddress when addr cannot be connected to."""
        try:
            self._socket(addr).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise Overloaded(f"send queue to {addr} is full") from None

    def __contains__(self, addr: str) -> bool:
        """Whether a socket to addr is open."""
        return addr in self._sockets

    def drop(self, addr: str) -> None:
        """Close the socket to addr (its peer is gone), dropping what is still queued
        there; a later send opens a new one."""
        sock = self._sockets.pop(addr, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self, *, linger_ms: int = 0) -> None:
        """Close every socket; linger_ms: how long queued messages may still go out."""
        for sock in self._sockets.values():
            sock.close(linger=linger_ms)
        self._sockets.clear()


async def request(
    ctx: zmq.asyncio.Context, addr: str, msg: Any, *, timeout_s: float,
    expected: tuple[type, ...], keys: ClusterKeys | None = None,
) -> Any:
    """One request/reply round trip over a fresh DEALER (admin CLI)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.client(sock)
    sock.connect(addr)
    try:
        await sock.send_multipart(wire.encode(msg))
        if not await sock.poll(timeout=int(timeout_s * 1000), flags=zmq.POLLIN):
            raise TimeoutError(f"no answer from {addr} within {timeout_s:.1f}s")
        frames = await sock.recv_multipart()
        return wire.decode(frames, expected)
    finally:
        sock.close(linger=0)
