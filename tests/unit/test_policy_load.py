"""Virtual usage and freeness (DESIGN §5) on crafted loads."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ferry.services.scheduler.load import (
    WIRE_INF,
    demand_blocks,
    dispatch_freeness,
    empty_load,
    freeness,
    high_priority_room,
    is_host,
    memory_load,
    to_wire,
    used_blocks,
    virtual_usage,
)


def load(total=100, **fields):
    return dataclasses.replace(empty_load(total), **fields)


@pytest.mark.parametrize(
    ("num_tokens", "blocks"), [(1, 1), (15, 1), (16, 1), (17, 2), (160, 10), (161, 11)]
)
def test_demand_is_ceil_of_tokens_over_block_size(num_tokens, blocks):
    assert demand_blocks(num_tokens, 16) == blocks


def test_idle_instance_freeness_is_its_capacity():
    assert freeness(empty_load(500), headroom_blocks=0) == 500


def test_freeness_follows_the_formula():
    # 100 blocks: 40 free, 10 reserved for a migration in -> 50 used by 5 running requests;
    # head-of-line demand 8; 2 of the running are high priority, headroom 5 each.
    lf = load(
        num_free_blocks=40,
        num_reserved_blocks=10,
        num_running=5,
        num_waiting=3,
        head_demand_blocks=8,
        num_running_high=2,
        used_blocks_high=12,
    )
    assert used_blocks(lf) == 50
    assert virtual_usage(lf, headroom_blocks=5) == 50 + 10 + 8 + 2 * 5
    assert freeness(lf, headroom_blocks=5) == pytest.approx((100 - 78) / 5)


def test_only_the_head_of_the_queue_counts():
    one = load(num_free_blocks=60, num_running=4, num_waiting=1, head_demand_blocks=20)
    many = dataclasses.replace(one, num_waiting=30)
    assert freeness(one, headroom_blocks=0) == freeness(many, headroom_blocks=0) == (60 - 20) / 4


def test_batch_size_is_at_least_one():
    # Nothing running, one big request waiting: B = 1, F = free - demand.
    lf = load(num_free_blocks=100, num_waiting=1, head_demand_blocks=30)
    assert freeness(lf, headroom_blocks=0) == 70


def test_freeness_goes_negative_when_the_queue_needs_more_than_is_free():
    lf = load(num_free_blocks=10, num_running=2, num_waiting=1, head_demand_blocks=30)
    assert freeness(lf, headroom_blocks=0) == -10


def test_headroom_lowers_freeness_of_instances_running_high_priority():
    normal = load(num_free_blocks=50, num_running=5)
    high = dataclasses.replace(normal, num_running_high=2, used_blocks_high=20)
    assert freeness(normal, headroom_blocks=10) == freeness(high, headroom_blocks=0)
    assert freeness(high, headroom_blocks=10) == pytest.approx(
        freeness(normal, headroom_blocks=10) - 4
    )


def test_draining_instance_has_infinite_usage():
    lf = load(num_free_blocks=100, draining=True)
    assert virtual_usage(lf, headroom_blocks=0) == math.inf
    assert freeness(lf, headroom_blocks=0) == -math.inf
    assert to_wire(freeness(lf, headroom_blocks=0)) == -WIRE_INF


def test_memory_load_counts_usage_reservations_and_queue():
    lf = load(
        num_free_blocks=50,
        num_reserved_blocks=10,
        num_running=3,
        num_waiting=2,
        head_demand_blocks=5,
        waiting_demand_blocks=12,
    )
    assert memory_load(lf) == pytest.approx((40 + 10 + 12) / 100)
    assert memory_load(empty_load(100)) == 0


def test_dispatch_freeness_counts_the_whole_queue_and_its_share_of_the_batch():
    lf = load(
        num_free_blocks=40, num_running=4, num_waiting=3, head_demand_blocks=5,
        waiting_demand_blocks=16, num_running_high=1
    )
    assert dispatch_freeness(lf, headroom_blocks=2) == pytest.approx((40 - 16 - 2) / 7)
    # Pairing's F counts the head only: the queue behind it does not change it.
    assert freeness(lf, headroom_blocks=2) == pytest.approx((40 - 5 - 2) / 4)
    assert dispatch_freeness(empty_load(100), headroom_blocks=0) == 100
    assert dispatch_freeness(load(draining=True), headroom_blocks=0) == -math.inf


def test_high_priority_room_counts_high_priority_work_the_queue_and_one_more_headroom():
    # 100 blocks: 10 reserved, 30 used (12 by the 2 high-priority requests), 9 queued.
    lf = load(
        num_free_blocks=60,
        num_reserved_blocks=10,
        num_running=6,
        num_waiting=2,
        waiting_demand_blocks=9,
        num_running_high=2,
        used_blocks_high=12,
    )
    assert is_host(lf)
    assert high_priority_room(lf, headroom_blocks=20) == 100 - 10 - 12 - 9 - 20 * 3
    # The normal requests it runs (18 blocks) do not count: only high-priority work does.
    more_normal = dataclasses.replace(lf, num_free_blocks=40, num_running=10)
    assert high_priority_room(more_normal, headroom_blocks=20) == high_priority_room(
        lf, headroom_blocks=20
    )
    assert high_priority_room(lf, headroom_blocks=25) < 0  # no room for a third one
    assert high_priority_room(load(draining=True), headroom_blocks=0) == -math.inf
    assert not is_host(load(num_free_blocks=50, num_running=5))
