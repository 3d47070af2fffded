"""Dispatch policies on crafted tables: the best instance wins, and equal loads spread."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from ferry.common.wire import Register
from ferry.services.scheduler.dispatch import (
    POLICY_NAMES,
    LeastLoad,
    Llumnix,
    Rotation,
    RoundRobin,
    make_dispatch_policy,
)
from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.table import InstanceTable, UnseenDispatch


def load(total=100, **fields):
    return dataclasses.replace(empty_load(total), **fields)


def equal_table(num_instances, num_blocks=1000):
    table = InstanceTable()
    for i in range(num_instances):
        table.register(
            Register(
                instance_id=f"i{i}",
                inbox_addr=f"tcp://h:{i}",
                num_blocks=num_blocks,
                block_size=16,
                max_model_len=4096,
                req_ids=(),
            ),
            now=0.0,
        )
    return table


def dispatch_all(policy, table, demands, *, high_priority=False):
    """Dispatch requests one by one, counting each into its instance as the scheduler does."""
    counts = collections.Counter()
    for n, demand in enumerate(demands):
        instance_id = policy.choose(table.loads(serving_only=True), high_priority=high_priority)
        table.record_dispatch(
            instance_id,
            UnseenDispatch(
                req_id=f"{'h' if high_priority else 'n'}{n}",
                demand_blocks=demand,
                high_priority=high_priority,
            ),
        )
        counts[instance_id] += 1
    return counts


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize(("num_requests", "num_instances"), [(12, 4), (100, 4), (7, 3), (64, 16)])
def test_equal_instances_and_equal_requests_spread_evenly(name, num_requests, num_instances):
    policy = make_dispatch_policy(name, headroom_blocks=0)
    counts = dispatch_all(policy, equal_table(num_instances), [4] * num_requests)
    assert len(counts) == num_instances
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_ties_spread_even_if_loads_are_never_updated(name):
    # The same equal loads offered every time (no counting): the tie-break alone spreads.
    policy = make_dispatch_policy(name, headroom_blocks=0)
    loads = {f"i{i}": load(num_free_blocks=50, num_running=5) for i in range(4)}
    counts = collections.Counter(policy.choose(loads) for _ in range(40))
    assert counts == {f"i{i}": 10 for i in range(4)}


@pytest.mark.parametrize("name", [LeastLoad.name, Llumnix.name])
def test_load_aware_policies_fill_a_fresh_instance_first(name):
    # Three busy instances and one empty one: the burst goes to the empty one until it
    # is as loaded as the others (counts update at dispatch, not at the next report).
    table = equal_table(4)
    for instance_id in ("i0", "i1", "i2"):
        for k in range(5):
            table.record_dispatch(
                instance_id,
                UnseenDispatch(req_id=f"{instance_id}-{k}", demand_blocks=20, high_priority=False),
            )
    policy = make_dispatch_policy(name, headroom_blocks=0)
    counts = dispatch_all(policy, table, [20] * 8)
    assert counts["i3"] >= 5
    assert max(counts.values()) - min(counts.values()) <= 5


def test_round_robin_ignores_load():
    policy = RoundRobin()
    loads = {"a": load(num_free_blocks=0, num_running=50), "b": empty_load(100)}
    assert [policy.choose(loads) for _ in range(4)] == ["a", "b", "a", "b"]


def test_llumnix_and_least_load_disagree_on_batch_size():
    # a: one request holding 50 blocks (F = 50); b: ten requests holding 20 (F = 8).
    loads = {
        "a": load(num_free_blocks=50, num_running=1),
        "b": load(num_free_blocks=80, num_running=10),
    }
    assert Llumnix(headroom_blocks=0).choose(loads) == "a"
    assert LeastLoad().choose(loads) == "b"


def test_least_load_counts_the_queue():
    loads = {
        "a": load(num_free_blocks=60, num_running=3),  # 40% used
        "b": load(
            num_free_blocks=80, num_running=2, num_waiting=3, head_demand_blocks=10,
            waiting_demand_blocks=30,
        ),  # 20% + 30%
    }
    assert LeastLoad().choose(loads) == "a"


def test_llumnix_counts_the_head_of_the_queue():
    loads = {
        "a": load(num_free_blocks=60, num_running=2),  # F = 30
        "b": load(
            num_free_blocks=80, num_running=2, num_waiting=1, head_demand_blocks=30
        ),  # F = 25
    }
    assert Llumnix(headroom_blocks=0).choose(loads) == "a"


def test_llumnix_dispatch_avoids_a_long_queue_behind_a_small_head():
    loads = {
        "a": load(num_free_blocks=50, num_running=5),  # F_dispatch = 10
        # Pairing's F would be (60 - 2) / 4 = 14.5; for dispatch the six queued requests
        # count: (60 - 6 * 2) / 10 = 4.8.
        "b": load(num_free_blocks=60, num_running=4, num_waiting=6, head_demand_blocks=2),
    }
    assert Llumnix(headroom_blocks=0).choose(loads) == "a"


def test_llumnix_dispatch_prefers_room_to_freeness_when_memory_is_short():
    # a: one request and 4 of 100 blocks free (F = 4, under the 5% room floor);
    # b: ten requests and 20 free (F = 2): the new request would preempt on a.
    loads = {
        "a": load(num_free_blocks=4, num_running=1),
        "b": load(num_free_blocks=20, num_running=10),
    }
    assert Llumnix(headroom_blocks=0).choose(loads) == "b"


def test_llumnix_dispatch_takes_the_most_room_when_no_instance_has_enough():
    loads = {
        "a": load(num_free_blocks=4, num_running=1),  # F = 4
        "b": load(num_free_blocks=3, num_running=0),  # F = 3, less room
        "c": load(num_free_blocks=4, num_running=8, num_waiting=1, waiting_demand_blocks=2),
    }
    assert Llumnix(headroom_blocks=0).choose(loads) == "a"


def test_headroom_steers_new_requests_away_from_high_priority_instances():
    loads = {
        "a": load(num_free_blocks=60, num_running=4, num_running_high=2, used_blocks_high=20),
        "b": load(num_free_blocks=60, num_running=4),
    }
    with_headroom = Llumnix(headroom_blocks=10)
    assert [with_headroom.choose(loads) for _ in range(3)] == ["b", "b", "b"]
    without = Llumnix(headroom_blocks=0)
    assert sorted(without.choose(loads) for _ in range(2)) == ["a", "b"]


# ---- priority-aware placement (llumnix with a headroom) ----------------------------------


def host(free, running, high, used_high, total=100, **fields):
    """An instance running `high` high-priority requests that hold `used_high` blocks."""
    return load(
        total,
        num_free_blocks=free,
        num_running=running,
        num_running_high=high,
        used_blocks_high=used_high,
        **fields,
    )


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_without_headroom_high_priority_requests_are_placed_like_normal_ones(name):
    loads = {
        "a": host(free=40, running=6, high=3, used_high=30),
        "b": load(num_free_blocks=70, num_running=3),
        "c": load(num_free_blocks=70, num_running=3),
    }
    normal = make_dispatch_policy(name, headroom_blocks=0)
    high = make_dispatch_policy(name, headroom_blocks=0)
    assert [high.choose(loads, high_priority=True) for _ in range(6)] == [
        normal.choose(loads) for _ in range(6)
    ]


def test_a_high_priority_request_joins_a_host_with_room_even_if_another_is_freer():
    # a: F_dispatch (40 - 2 * 10) / 6 = 3.3, room 100 - 30 - 3 * 10 = 40;
    # b: nothing high-priority, F_dispatch 90.
    loads = {"a": host(free=40, running=6, high=2, used_high=30), "b": load(num_free_blocks=90)}
    policy = Llumnix(headroom_blocks=10)
    assert [policy.choose(loads, high_priority=True) for _ in range(3)] == ["a", "a", "a"]


def test_a_full_host_is_skipped_and_the_freest_instance_becomes_a_host():
    # a: room 100 - 60 - 10 * (5 + 1) < 0, full; the freest of all takes it: c. With room
    # exactly 0 (100 - 50 - 10 * (4 + 1)) the host still takes it.
    full = {
        "a": host(free=40, running=5, high=5, used_high=60),
        "b": load(num_free_blocks=50, num_running=5),
        "c": load(num_free_blocks=80, num_running=2),
    }
    policy = Llumnix(headroom_blocks=10)
    assert policy.choose(full, high_priority=True) == "c"
    with_room = dict(full, a=host(free=50, running=4, high=4, used_high=50))
    assert policy.choose(with_room, high_priority=True) == "a"


def test_equal_hosts_share_high_priority_requests():
    loads = {
        "a": host(free=50, running=5, high=2, used_high=20),
        "b": host(free=50, running=5, high=2, used_high=20),
        "c": load(num_free_blocks=90, num_running=1),
    }
    policy = Llumnix(headroom_blocks=10)
    counts = collections.Counter(policy.choose(loads, high_priority=True) for _ in range(10))
    assert counts == {"a": 5, "b": 5}


def test_among_hosts_with_room_the_freest_wins():
    loads = {
        "a": host(free=50, running=5, high=2, used_high=20),  # F_dispatch 6
        "b": host(free=50, running=3, high=2, used_high=20),  # F_dispatch 10
    }
    assert Llumnix(headroom_blocks=10).choose(loads, high_priority=True) == "b"


def test_a_normal_request_keeps_away_from_hosts_even_freer_ones():
    loads = {
        "a": host(free=80, running=2, high=1, used_high=10),  # F_dispatch (80 - 10) / 2 = 35
        "b": load(num_free_blocks=20, num_running=5),  # F_dispatch 4
    }
    policy = Llumnix(headroom_blocks=10)
    assert [policy.choose(loads) for _ in range(3)] == ["b", "b", "b"]


def test_a_normal_request_goes_to_the_freest_of_all_when_no_other_instance_can_take_it():
    # b's queue needs more than it has free (F_dispatch < 0): the freest of all, the host.
    loads = {
        "a": host(free=80, running=2, high=1, used_high=10),
        "b": load(num_free_blocks=10, num_running=5, num_waiting=2, waiting_demand_blocks=30),
    }
    assert Llumnix(headroom_blocks=10).choose(loads) == "a"
    every_one_a_host = {"a": loads["a"], "c": host(free=30, running=5, high=1, used_high=10)}
    assert Llumnix(headroom_blocks=10).choose(every_one_a_host) == "a"


def test_a_burst_of_high_priority_requests_fills_one_host_before_the_next():
    # Idle instances of 100 blocks, headroom 20, 4 blocks each: a host takes a fifth
    # request while 100 - 4 * n - 20 * (n + 1) >= 0, i.e. n <= 3: four per host.
    table = equal_table(4, num_blocks=100)
    policy = Llumnix(headroom_blocks=20)
    high = dispatch_all(policy, table, [4] * 8, high_priority=True)
    assert sorted(high.values()) == [4, 4]
    # Normal requests spread over the other two.
    normal = dispatch_all(policy, table, [4] * 6)
    assert set(normal) == {"i0", "i1", "i2", "i3"} - set(high)
    assert list(normal.values()) == [3, 3]


def test_rotation_survives_membership_changes():
    rotation = Rotation()
    assert rotation.pick(["b", "a", "c"]) == "a"
    assert rotation.pick(["a", "b", "c"]) == "b"
    assert rotation.pick(["a", "c", "d"]) == "c"  # b left: the next after b
    assert rotation.pick(["a", "c", "d"]) == "d"
    assert rotation.pick(["a", "c", "d"]) == "a"  # wraps


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        make_dispatch_policy("random", headroom_blocks=0)
