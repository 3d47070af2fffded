"""The gateway's bounded work pool, and the HTTP body bound derived from the model."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from ferry.services.gateway.http_api import BODY_SLACK_BYTES, max_body_bytes
from ferry.services.gateway.pool import WorkPool
from ferry.services.gateway.requests import Rejected


def test_pool_queues_up_to_its_bound_then_rejects_with_429():
    async def body():
        pool = WorkPool(num_threads=1, max_queued=1)
        gate = threading.Event()
        ran = []

        def job(name):
            gate.wait(5)
            ran.append(name)
            return name

        running = asyncio.ensure_future(pool.run(job, "a"))
        queued = asyncio.ensure_future(pool.run(job, "b"))
        await asyncio.sleep(0.05)
        assert pool.num_jobs == 2
        with pytest.raises(Rejected) as err:
            await pool.run(job, "c")
        assert err.value.code == 429 and "overloaded" in err.value.message
        gate.set()
        assert await asyncio.gather(running, queued) == ["a", "b"]
        await asyncio.sleep(0.01)
        assert pool.num_jobs == 0 and ran == ["a", "b"]
        pool.close()

    asyncio.run(body())


def test_a_queued_job_whose_caller_left_never_runs_and_frees_its_slot():
    async def body():
        pool = WorkPool(num_threads=1, max_queued=1)
        gate = threading.Event()
        ran = []

        def job(name):
            gate.wait(5)
            ran.append(name)

        running = asyncio.ensure_future(pool.run(job, "a"))
        queued = asyncio.ensure_future(pool.run(job, "b"))
        await asyncio.sleep(0.05)
        queued.cancel()
        await asyncio.sleep(0.01)
        assert pool.num_jobs == 1  # the slot is free again
        gate.set()
        await running
        await asyncio.sleep(0.05)
        assert ran == ["a"] and pool.num_jobs == 0
        pool.close()

    asyncio.run(body())


def test_pool_passes_exceptions_through():
    async def body():
        pool = WorkPool(num_threads=2, max_queued=0)

        def fail():
            raise Rejected(400, "bad")

        with pytest.raises(Rejected, match="bad"):
            await pool.run(fail)
        pool.close()

    asyncio.run(body())


def test_body_bound_follows_the_longest_prompt_that_fits():
    text = SimpleNamespace(max_prompt_chars=256 * 10, max_model_len=256)
    bound = 12 * 2560 + 64 * 256 + BODY_SLACK_BYTES
    assert max_body_bytes(text, max_frame_bytes=16 << 20) == bound
    assert max_body_bytes(text, max_frame_bytes=4096) == 4096  # never above the frame cap
    unbounded = SimpleNamespace(max_prompt_chars=None, max_model_len=256)
    assert max_body_bytes(unbounded, max_frame_bytes=16 << 20) == 16 << 20
