"""The gateway's bounded pool for work too long for the event loop: parsing large HTTP
bodies, rendering long chat templates, tokenizing long prompts.

A fixed number of threads (tokenizers' encode_batch and most of the JSON scanning let
the loop's thread run meanwhile) and a bounded queue in front of them; past it `run`
raises Rejected(429) at once instead of piling up work no one will wait for. A job whose
caller gave up (client gone, handler cancelled) before a thread took it never runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from ferry.services.gateway.requests import Rejected

T = TypeVar("T")


class WorkPool:
    def __init__(self, num_threads: int, max_queued: int) -> None:
        if num_threads < 1 or max_queued < 0:
            raise ValueError(f"need >= 1 thread and a queue >= 0, got {num_threads}, {max_queued}")
        self.num_threads = num_threads
        self.max_queued = max_queued
        self.executor = concurrent.futures.ThreadPoolExecutor(
            num_threads, thread_name_prefix="ferry-gateway-pool")
        self.num_jobs = 0  # submitted and not finished: running + queued (loop thread only)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a pool thread; Rejected(429) when every thread is busy and the
        queue is full. Cancelling the caller cancels the job if it has not started."""
        if self.num_jobs >= self.num_threads + self.max_queued:
            raise Rejected(429, f"overloaded: {self.num_jobs} long requests being parsed or "
                                "tokenized")
        loop = asyncio.get_running_loop()
        job = self.executor.submit(fn, *args)
        self.num_jobs += 1
        job.add_done_callback(lambda _: _call_soon(loop, self._finished))
        return await asyncio.wrap_future(job)

    def _finished(self) -> None:
        self.num_jobs -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """From any thread; nothing once the loop is closed (the gateway is gone)."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:
        pass
