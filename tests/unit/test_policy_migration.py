"""Migration pairing on crafted tables."""

from __future__ import annotations

import dataclasses

from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.migration import MigrationDecision, pair_migrations


def load(total=100, **fields):
    return dataclasses.replace(empty_load(total), **fields)


def busy(free=0, running=10, **fields):
    """F = free / running (no queue): free=5, running=10 -> F = 0.5."""
    return load(num_free_blocks=free, num_running=running, **fields)


def pairs(loads, threshold=1.0, margin=1.0, max_per_instance=2, headroom_blocks=0):
    decisions = pair_migrations(
        loads,
        threshold=threshold,
        margin=margin,
        max_per_instance=max_per_instance,
        headroom_blocks=headroom_blocks,
    )
    return [(d.src_instance_id, d.dst_instance_id) for d in decisions]


def test_an_overloaded_instance_pairs_with_a_free_one():
    assert pairs({"hot": busy(free=5), "cold": busy(free=80, running=2)}) == [("hot", "cold")]


def test_decisions_leave_the_request_to_the_source():
    decisions = pair_migrations(
        {"hot": busy(free=5), "cold": busy(free=80, running=2)},
        threshold=1.0,
        margin=1.0,
        max_per_instance=2,
        headroom_blocks=0,
    )
    assert decisions == [MigrationDecision("hot", "cold", None)]


def test_nothing_to_do_when_everyone_is_comfortable():
    assert pairs({"a": busy(free=50, running=5), "b": busy(free=60, running=5)}) == []


def test_lowest_freeness_pairs_with_highest_and_no_instance_plays_two_roles():
    loads = {
        "s1": busy(free=1),  # F 0.1
        "s2": busy(free=5),  # F 0.5
        "s3": busy(free=8),  # F 0.8, no destination left for it
        "d1": busy(free=90, running=1),  # F 90
        "d2": busy(free=40, running=2),  # F 20
    }
    assert pairs(loads) == [("s1", "d1"), ("s2", "d2")]


def test_a_waiting_queue_makes_a_source_even_with_freeness_above_threshold():
    loads = {
        "queued": load(
            num_free_blocks=40, num_running=2, num_waiting=3, head_demand_blocks=30
        ),  # F 5
        "idle": load(num_free_blocks=100),  # F 100
    }
    assert pairs(loads) == [("queued", "idle")]


def test_an_instance_with_a_queue_is_never_a_destination():
    loads = {
        "hot": busy(free=5),
        "queued": load(num_free_blocks=90, num_running=1, num_waiting=1, head_demand_blocks=1),
    }
    assert pairs(loads) == []


def test_destination_must_clear_the_threshold_by_the_margin():
    # dst F = 1.5: not a source, but not clearly free either (threshold 1 + margin 1 = 2).
    loads = {"hot": busy(free=1), "lukewarm": busy(free=15)}
    assert pairs(loads) == []
    assert pairs(loads, margin=0.4) == [("hot", "lukewarm")]


def test_gap_between_source_and_destination_must_exceed_the_margin():
    # The source has a queue (F = (40 - 30) / 2 = 5); the destination is free enough on its
    # own (F 5.5 >= threshold + margin) but barely freer than the source: no migration.
    loads = {
        "queued": load(num_free_blocks=40, num_running=2, num_waiting=1, head_demand_blocks=30),
        "other": load(num_free_blocks=11, num_running=2),
    }
    assert pairs(loads, threshold=1.0, margin=1.0) == []
    assert pairs(loads, threshold=1.0, margin=0.4) == [("queued", "other")]


def test_no_source_without_running_requests():
    # Only waiting requests, nothing running: there is nothing a migration could move.
    loads = {
        "stuck": load(num_free_blocks=0, num_waiting=4, head_demand_blocks=10),
        "idle": empty_load(100),
    }
    assert pairs(loads) == []


def test_instances_at_their_migration_bound_take_no_part():
    loads = {"hot": busy(free=5, num_migrations_out=2), "cold": busy(free=80, running=2)}
    assert pairs(loads) == []
    loads = {
        "hot": busy(free=5),
        "cold": busy(free=80, running=2, num_migrations_in=1, num_migrations_out=1),
    }
    assert pairs(loads) == []
    loads = {
        "hot": busy(free=5, num_migrations_out=1),
        "cold": busy(free=80, running=2, num_migrations_in=1),
    }
    assert pairs(loads) == [("hot", "cold")]


def test_draining_instances_are_sources_first_whatever_their_load():
    loads = {
        "draining": load(num_free_blocks=95, num_running=1, draining=True),
        "hot": busy(free=5),
        "cold": busy(free=80, running=2),
    }
    assert pairs(loads) == [("draining", "cold")]


def test_a_drained_instance_is_not_a_source_and_never_a_destination():
    loads = {"empty_draining": load(draining=True), "hot": busy(free=5)}
    assert pairs(loads) == []


def test_high_priority_headroom_can_make_a_source():
    # F = 30/5 = 6 without headroom; with 2 high-priority requests and headroom 14: 2/5.
    loads = {"a": load(num_free_blocks=30, num_running=5, num_running_high=2), "b": empty_load(100)}
    assert pairs(loads) == []
    assert pairs(loads, headroom_blocks=14) == [("a", "b")]


def test_ties_are_ordered_by_instance_id():
    loads = {"s2": busy(free=5), "s1": busy(free=5), "d2": empty_load(100), "d1": empty_load(100)}
    assert pairs(loads) == [("s1", "d1"), ("s2", "d2")]
