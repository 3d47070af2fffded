"""The prefix cache on a real cluster (`ferry up --policy ferry`, 2 tiny-model CPU
workers): a request whose prompt shares a long prefix with an earlier one goes to the
instance that cached it, skips that prefill, and yields the very tokens the uncached
run yielded (greedy)."""

from __future__ import annotations

import time

import pytest

from ferry import Client
from ferry.bench.local_cluster import start_cluster

pytestmark = pytest.mark.e2e

PREFIX = list(range(100, 420))  # 320 tokens: 20 full blocks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    c = start_cluster(tmp, workers=2, model_cache=str(tmp_path_factory.getbasetemp() / "models"),
                      extra=("--policy", "ferry", "--worker-arg=--num-blocks=512"))
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
    gained = {i: n - before.get(i, 0) for i, n in hit_tokens(cluster).items()}
    # both later requests found the 320-token prefix (both on the one instance caching it)
    assert max(gained.values()) >= 2 * len(PREFIX), gained
    assert len(other.token_ids) == 4
