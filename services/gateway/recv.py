"""Receiving in batches. Awaiting each message on a zmq.asyncio socket costs several times
a plain non-blocking receive, so a loop awaits one message, then takes whatever else is
already queued without waiting (bounded), then yields to the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

MAX_BATCH = 256  # messages taken per wake-up; bounds the time other tasks wait


async def recv_batches(
    sock: zmq.asyncio.Socket, max_batch: int = MAX_BATCH, *, copy: bool = True
) -> AsyncIterator[list[list[bytes]] | list[list[zmq.Frame]]]:
    """Batches of messages: lists of bytes frames, or with copy=False of zmq.Frame (whose
    properties say who sent them)."""
    # A synchronous view of the same socket. Safe here: it only receives, right after the
    # awaited receive completed, and pyzmq's next awaited receive tries the socket before
    # it waits on the descriptor again.
    drain = zmq.Socket.shadow(sock.underlying)
    while True:
        batch = [await sock.recv_multipart(copy=copy)]
        while len(batch) < max_batch:
            try:
                batch.append(drain.recv_multipart(zmq.NOBLOCK, copy=copy))
            except zmq.Again:
                break
        yield batch
        await asyncio.sleep(0)
