"""Zero-drop drain on a real cluster (`ferry up`, 2 tiny-model CPU workers): `ferry drain`
empties a worker by migrating its requests, and SIGTERM makes a worker do the same before
it exits. No stream is cut short, and each yields exactly the tokens an undisturbed run of
the same seeded request yields."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ferry import AsyncClient
from ferry.bench.local_cluster import Cluster, pid_alive, start_cluster

pytestmark = pytest.mark.e2e

NUM_STREAMS = 6
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    tmp = tmp_path_factory.mktemp("drain")
    models = tmp_path_factory.getbasetemp() / "models"
    c = start_cluster(tmp, workers=2, model_cache=str(models),
                      extra=("--worker-arg=--num-blocks=1024",))
    yield c
    c.stop()


async def streams(cluster: Cluster, seeds: range, during=None) -> dict[int, list[int]]:
    """Run one seeded stream per seed; `during()` (a blocking call, run in a thread) starts
    once every stream has its first tokens. Returns seed -> output tokens, checking that
    each arrives complete, in order, with no error."""
    async with AsyncClient(cluster.sdk_addr, timeout_s=120) as client:
        started = asyncio.Event()
        num_started = 0

        async def one(seed: int) -> list[int]:
            nonlocal num_started
            tokens: list[int] = []
            async for chunk in client.stream(prompt_token_ids=[11, 12, 13, 14 + seed],
                                             max_tokens=MAX_TOKENS, temperature=0.8,
                                             seed=seed, ignore_eos=True):
                assert chunk.first_index == len(tokens)
                if not tokens:
                    num_started += 1
                    if num_started == len(seeds):
                        started.set()
                tokens += chunk.token_ids
                last = chunk.finish_reason
                await asyncio.sleep(0.01)  # a client reading at its own pace
            assert last == "length" and len(tokens) == MAX_TOKENS
            return tokens

        tasks = [asyncio.create_task(one(seed)) for seed in seeds]
        if during is not None:
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.to_thread(during)
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 180)
    return dict(zip(seeds, outs, strict=True))


def held_by(cluster: Cluster, instance_id: str) -> int:
    inst = next(i for i in cluster.status()["instances"] if i["instance_id"] == instance_id)
    return inst["num_running"] + inst["num_waiting"]


def test_ferry_drain_moves_every_stream_off_with_the_same_tokens(cluster):
    seeds = range(NUM_STREAMS)
    reference = asyncio.run(streams(cluster, seeds))
    drained = {}

    def drain():
        drained["out"] = cluster.cli("drain", "worker-0", "--timeout", "60")

    got = asyncio.run(streams(cluster, seeds, during=drain))
    out = drained["out"]
    assert out.returncode == 0, out.stderr
    assert got == reference  # migrated mid-stream: the very same tokens
    status = cluster.status()
    assert status["migrations"]["committed"] >= 1
    assert next(i for i in status["instances"] if i["instance_id"] == "worker-0")["draining"]
    assert cluster.cli("drain", "worker-0", "--cancel").returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            i["draining"] for i in cluster.status()["instances"]):
        time.sleep(0.1)
    assert not any(i["draining"] for i in cluster.status()["instances"])
    cluster.wait_idle()


def test_sigterm_drains_a_worker_before_it_exits(cluster):
    seeds = range(100, 100 + NUM_STREAMS)
    reference = asyncio.run(streams(cluster, seeds))
    pid = cluster.ready["pids"]["worker-1"]

    def stop_worker_1():
        os.kill(pid, signal.SIGTERM)

    got = asyncio.run(streams(cluster, seeds, during=stop_worker_1))
    assert got == reference
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), "the worker did not exit after draining"
    # it said goodbye: gone from the scheduler's table at once, not after a timeout
    assert [i["instance_id"] for i in cluster.status()["instances"]] == ["worker-0"]
    assert held_by(cluster, "worker-0") == 0 or cluster.wait_idle()
