"""The prefix cache on a real cluster (`ferry up --policy ferry`, 2 tiny-model CPU
workers): a request whose prompt shares a long prefix with an earlier one goes to the
instance that cached it, skips that prefill, and yields the very tokens the uncached
run yielded (greedy); when that instance is busy, the free one pulls the prefix from it
(KV over gloo) and yields them too."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from ferry import AsyncClient, Client
from ferry.bench.local_cluster import start_cluster

pytestmark = pytest.mark.e2e

PREFIX = list(range(100, 420))  # 320 tokens: 20 full blocks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    # Migration and the pending queue off: a queue built on one worker stays there.
    c = start_cluster(tmp, workers=2, model_cache=str(tmp_path_factory.getbasetemp() / "models"),
                      extra=("--policy", "ferry", "--worker-arg=--num-blocks=4096",
                             "--worker-arg=--max-num-seqs=2",
                             "--scheduler-arg=--no-enable-migration",
                             "--scheduler-arg=--no-hold-until-room",
                             "--scheduler-arg=--kv-bandwidth-bytes-s=1e11"))
    yield c
    c.stop()


def hit_tokens(cluster) -> dict[str, int]:
    return {i["instance_id"]: i["num_prefix_hit_tokens"] for i in cluster.status()["instances"]}


def test_a_shared_prefix_is_found_where_it_is_cached_with_the_same_tokens(cluster):
    with Client(cluster.sdk_addr) as client:
        first = client.generate(prompt_token_ids=PREFIX + [7, 8, 9], max_tokens=12,
                                temperature=0.0, ignore_eos=True)
        time.sleep(0.3)  # a report or two: the scheduler's index learns the cached blocks
        before = hit_tokens(cluster)
        again = client.generate(prompt_token_ids=PREFIX + [7, 8, 9], max_tokens=12,
                                temperature=0.0, ignore_eos=True)
        other = client.generate(prompt_token_ids=PREFIX + [1, 2, 3, 4, 5], max_tokens=4,
                                temperature=0.0, ignore_eos=True)
    assert again.token_ids == first.token_ids  # cached KV: the same greedy tokens
    # what usage reports: nothing cached at first, then the 20 full blocks of the prefix
    assert (first.num_cached_prompt_tokens, again.num_cached_prompt_tokens) == (0, len(PREFIX))
    gained = {i: n - before.get(i, 0) for i, n in hit_tokens(cluster).items()}
    # both later requests found the 320-token prefix (both on the one instance caching it)
    assert max(gained.values()) >= 2 * len(PREFIX), gained
    assert len(other.token_ids) == 4


LONG_PREFIX = [100 + (i * 37) % 900 for i in range(640)]  # 40 full blocks
BUSY_PROMPT_LEN = 2000


def instance(cluster, instance_id: str) -> dict:
    return next(i for i in cluster.status()["instances"] if i["instance_id"] == instance_id)


def busy_queue(cluster, num: int) -> threading.Thread:
    """num long, distinct prompts at once, from a thread (4 outputs each)."""
    async def send() -> None:
        async with AsyncClient(cluster.sdk_addr, timeout_s=300) as client:
            await asyncio.gather(*[
                client.generate(prompt_token_ids=[200 + i] + [
                    300 + (j * 7 + i) % 600 for j in range(BUSY_PROMPT_LEN - 1)],
                    max_tokens=4, temperature=0.0, ignore_eos=True)
                for i in range(num)])

    thread = threading.Thread(target=asyncio.run, args=(send(),), daemon=True)
    thread.start()
    return thread


def test_a_busy_holders_prefix_is_pulled_to_the_free_instance_with_the_same_tokens(cluster):
    """worker-0 alone computes a 640-token prefix (worker-1 drained), then gets a queue of
    long prompts (2 run at once: the queue waits without taking the cached prefix's
    memory); worker-1 serves again. The next request with that prefix: worker-0 has it
    but a queue, worker-1 none of it and no queue; copying 40 blocks beats computing 640
    tokens, so worker-1 pulls them from worker-0 and finds them in its cache. Greedy
    tokens equal worker-0's."""
    prompt = LONG_PREFIX + [7, 8, 9]
    pulls_before = cluster.status()["prefix_pulls"]
    drained = cluster.cli("drain", "worker-1", "--timeout", "30")
    assert drained.returncode == 0, drained.stderr
    try:
        with Client(cluster.sdk_addr) as client:
            first = client.generate(prompt_token_ids=prompt, max_tokens=12, temperature=0.0,
                                    ignore_eos=True)
        rate = instance(cluster, "worker-0")["prefill_tokens_per_s"] or 20_000
        hits_before = instance(cluster, "worker-1")["num_prefix_hit_tokens"]
        # ~4 s of prefill queued at worker-0 (at most 24 x 126 blocks: no eviction)
        queue = busy_queue(cluster, min(24, max(8, math.ceil(4 * rate / BUSY_PROMPT_LEN))))
        time.sleep(0.5)
    finally:
        assert cluster.cli("drain", "worker-1", "--cancel").returncode == 0
    deadline = time.monotonic() + 10
    while not (instance(cluster, "worker-0")["pending_prefill_tokens"] > BUSY_PROMPT_LEN
               and not instance(cluster, "worker-1")["draining"]):
        assert time.monotonic() < deadline, cluster.status()
    with Client(cluster.sdk_addr) as client:
        again = client.generate(prompt_token_ids=prompt, max_tokens=12, temperature=0.0,
                                ignore_eos=True)
    queue.join(timeout=120)
    assert again.token_ids == first.token_ids
    assert again.num_cached_prompt_tokens == len(LONG_PREFIX)  # pulled: not computed here
    pulls = cluster.status()["prefix_pulls"]
    assert pulls["sent"] == pulls_before["sent"] + 1, pulls
    assert pulls["ok"] == pulls_before["ok"] + 1, pulls
    assert pulls["blocks"] - pulls_before["blocks"] == len(LONG_PREFIX) // 16, pulls
    # worker-1 never computed the prefix: it found the 640 pulled tokens in its cache
    gained = instance(cluster, "worker-1")["num_prefix_hit_tokens"] - hits_before
    assert gained >= len(LONG_PREFIX), gained
    out = cluster.cli("status")
    assert "prefix pulls" in out.stdout and out.returncode == 0


BLOCK_SIZE = 16  # the workers' default
OPENAI_PROMPT = [7 + (i * 13) % 800 for i in range(200)]  # 12 full blocks, shared with none


def test_usage_reports_cached_prompt_tokens_through_the_openai_client(cluster):
    """The same long prompt twice: the first computes it, the second finds its full blocks
    in the prefix cache (placed where they are) and says so in usage, whole and streamed."""
    import openai

    oai = openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)
    first = oai.completions.create(model="tiny", prompt=OPENAI_PROMPT, max_tokens=4,
                                   temperature=0.0)
    time.sleep(0.3)  # a report or two: the scheduler's index learns the cached blocks
    again = oai.completions.create(model="tiny", prompt=OPENAI_PROMPT, max_tokens=4,
                                   temperature=0.0)
    stream = oai.completions.create(model="tiny", prompt=OPENAI_PROMPT, max_tokens=4,
                                    temperature=0.0, stream=True,
                                    stream_options={"include_usage": True})
    streamed = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == len(OPENAI_PROMPT)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < len(OPENAI_PROMPT) and cached % BLOCK_SIZE == 0, cached
    assert [u.prompt_tokens_details.cached_tokens for u in streamed] == [cached]
    assert again.choices[0].text == first.choices[0].text  # the cached KV: the same tokens
