"""The instance table: load counted at dispatch time, superseded only by reports that saw it."""

from __future__ import annotations

import dataclasses
import random

import pytest

from ferry.common.wire import LoadReport, Register
from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.table import InstanceTable, UnseenDispatch


def register(table, instance_id="a", num_blocks=100, now=0.0, req_ids=()):
    return table.register(
        Register(
            instance_id=instance_id,
            inbox_addr=f"tcp://{instance_id}:1",
            num_blocks=num_blocks,
            block_size=16,
            max_model_len=4096,
            req_ids=req_ids,
        ),
        now,
    )


def report(instance_id="a", seq=0, received=0, total=100, **fields):
    return LoadReport(
        instance_id=instance_id,
        inbox_addr=f"tcp://{instance_id}:1",
        seq=seq,
        num_dispatch_received=received,
        load=dataclasses.replace(empty_load(total), **fields),
    )


def dispatch(table, instance_id="a", demand=10, high=False, req_id="r"):
    table.record_dispatch(
        instance_id, UnseenDispatch(req_id=req_id, demand_blocks=demand, high_priority=high)
    )


@pytest.fixture
def table():
    t = InstanceTable()
    register(t)
    return t


def test_before_any_report_the_instance_is_empty(table):
    assert table.load("a") == empty_load(100)


def test_a_dispatch_counts_at_once(table):
    dispatch(table, demand=10)
    lf = table.load("a")
    assert (lf.num_free_blocks, lf.num_running, lf.num_waiting) == (90, 1, 0)


def test_report_supersedes_only_the_dispatches_it_has_seen(table):
    for i in range(5):
        dispatch(table, demand=10, req_id=f"r{i}")
    # The worker saw 3 of them: they are in its free/running counts already.
    assert table.apply_report(report(seq=1, received=3, num_free_blocks=70, num_running=3), now=0.1)
    lf = table.load("a")
    assert (lf.num_free_blocks, lf.num_running) == (50, 5)
    # The next report saw all five: nothing is left on top.
    table.apply_report(report(seq=2, received=5, num_free_blocks=50, num_running=5), now=0.2)
    assert (table.load("a").num_free_blocks, table.load("a").num_running) == (50, 5)


def test_a_stale_report_is_ignored_but_counts_as_a_heartbeat(table):
    dispatch(table)
    table.apply_report(report(seq=5, received=1, num_free_blocks=90, num_running=1), now=1.0)
    assert table.apply_report(report(seq=4, received=0, num_free_blocks=100), now=2.0)
    assert table.load("a").num_free_blocks == 90
    assert table["a"].last_heard_s == 2.0


def test_dispatches_the_worker_got_elsewhere_rebase_the_count(table):
    # The worker counted 7 dispatches (gateways in bypass mode) while we sent 1.
    dispatch(table, req_id="r0")
    table.apply_report(report(seq=1, received=7, num_free_blocks=30, num_running=7), now=0.1)
    assert table.load("a").num_free_blocks == 30
    # From now on our dispatches stay on top until a report counts them.
    dispatch(table, demand=5, req_id="r1")
    dispatch(table, demand=5, req_id="r2")
    table.apply_report(report(seq=2, received=8, num_free_blocks=25, num_running=8), now=0.2)
    lf = table.load("a")
    assert (lf.num_free_blocks, lf.num_running) == (20, 9)


def test_reregistered_worker_with_a_large_counter(table):
    # After a scheduler restart a worker's counter is far ahead of ours (0).
    register(table, req_ids=("old",))
    table.apply_report(report(seq=1, received=1000, num_free_blocks=80, num_running=1), now=0.1)
    dispatch(table, demand=10, req_id="r1")
    dispatch(table, demand=10, req_id="r2")
    table.apply_report(report(seq=2, received=1001, num_free_blocks=70, num_running=2), now=0.2)
    lf = table.load("a")
    assert (lf.num_free_blocks, lf.num_running) == (60, 3)


def test_an_unseen_dispatch_that_does_not_fit_waits_at_the_head(table):
    table.apply_report(report(seq=1, num_free_blocks=15, num_running=4), now=0.1)
    dispatch(table, demand=10, req_id="fits")
    dispatch(table, demand=8, req_id="head")
    dispatch(table, demand=2, req_id="behind")  # would fit, but FCFS keeps it behind the head
    lf = table.load("a")
    assert (lf.num_free_blocks, lf.num_running, lf.num_waiting, lf.head_demand_blocks) == (
        5,
        5,
        2,
        8,
    )


def test_unseen_dispatches_queue_behind_a_reported_queue(table):
    table.apply_report(
        report(seq=1, num_free_blocks=50, num_running=2, num_waiting=1, head_demand_blocks=60),
        now=0.1,
    )
    dispatch(table, demand=1)
    lf = table.load("a")
    assert (lf.num_free_blocks, lf.num_waiting, lf.head_demand_blocks) == (50, 2, 60)


def test_high_priority_dispatch_counts_as_high(table):
    dispatch(table, demand=7, high=True)
    lf = table.load("a")
    assert (lf.num_running_high, lf.used_blocks_high) == (1, 7)


def test_cancel_last_dispatch_undoes_it(table):
    dispatch(table, demand=10)
    table.cancel_last_dispatch("a")
    assert table.load("a") == empty_load(100)
    assert table["a"].num_dispatch_sent == 0


def test_migrations_count_as_issued_or_as_reported_whichever_is_more(table):
    register(table, "b")
    table.start_migration("a", "b")
    assert (table.load("a").num_migrations_out, table.load("b").num_migrations_in) == (1, 1)
    table.apply_report(report(seq=1, num_migrations_out=2), now=0.1)
    assert table.load("a").num_migrations_out == 2
    table.end_migration("a", "b")
    table.end_migration("a", "b")  # never below zero
    assert table["a"].num_migrations_out == 0
    assert table.load("b").num_migrations_in == 0


def test_silence_dead_and_draining(table):
    register(table, "b", now=5.0)
    assert table.silent_since(1.0) == ["a"]
    table.mark_dead("a")
    assert table.silent_since(10.0) == ["b"]  # a dead instance is not reported twice
    assert set(table.loads()) == {"b"}
    table.set_draining("b")
    assert table.loads()["b"].draining
    assert table.loads(serving_only=True) == {}


def test_report_from_unknown_or_dead_instance_is_refused(table):
    assert not table.apply_report(report(instance_id="zzz"), now=0.0)
    table.mark_dead("a")
    assert not table.apply_report(report(seq=9), now=0.0)


def test_register_starts_the_record_over(table):
    dispatch(table)
    table.apply_report(report(seq=3, received=1, num_free_blocks=90, num_running=1), now=0.1)
    register(table, num_blocks=200)
    assert table.load("a") == empty_load(200)
    # seq numbering restarts with the new record
    assert table.apply_report(report(seq=0, total=200, num_free_blocks=150, num_running=2), now=0.2)
    assert table.load("a").num_free_blocks == 150


def test_cached_estimate_always_equals_a_fresh_one():
    """The estimate is updated in place on dispatch and dropped on other changes; a random
    mix of operations must leave it equal to one computed from scratch."""
    rng = random.Random(0)
    table = InstanceTable()
    for instance_id in ("a", "b"):
        register(table, instance_id)
    seq = {"a": 0, "b": 0}
    for step in range(2000):
        instance_id = rng.choice("ab")
        inst = table[instance_id]
        op = rng.random()
        if op < 0.5:
            dispatch(
                table,
                instance_id,
                demand=rng.randint(1, 30),
                high=rng.random() < 0.3,
                req_id=f"r{step}",
            )
        elif op < 0.7:
            seq[instance_id] += 1
            received = inst.dispatch_base + rng.randint(0, inst.num_dispatch_sent)
            free = rng.randint(0, 100)
            table.apply_report(
                report(
                    instance_id,
                    seq=seq[instance_id],
                    received=received,
                    num_free_blocks=free,
                    num_running=rng.randint(0, 5),
                    num_waiting=rng.randint(0, 2),
                    head_demand_blocks=rng.randint(0, 20),
                ),
                now=float(step),
            )
        elif op < 0.8:
            table.start_migration(instance_id, "b" if instance_id == "a" else "a")
        elif op < 0.9:
            table.end_migration(instance_id, "b" if instance_id == "a" else "a")
        elif op < 0.95 and inst.num_dispatch_sent:
            table.cancel_last_dispatch(instance_id)
        cached = table.load(instance_id)
        inst.estimate = None
        assert cached == table.load(instance_id), f"step {step}"
