"""Auto-scaling decisions: band, hysteresis, cooldown, min/max, drain then terminate."""

from __future__ import annotations

import dataclasses

import pytest

from ferry.common.wire import SetDraining
from ferry.services.scheduler.autoscale import (
    Autoscaler,
    Drain,
    ScaleUp,
    Terminate,
    autoscale_round,
)
from ferry.services.scheduler.load import empty_load
from ferry.services.scheduler.provisioner import WorkerHandle
from tests.unit.test_scheduler_core import addr, make_core, register, report

COOLDOWN_S = 10.0


def load(total=100, **fields):
    return dataclasses.replace(empty_load(total), **fields)


def hot():
    return load(num_free_blocks=10, num_running=10)  # F = 1


def warm():
    return load(num_free_blocks=60, num_running=2)  # F = 30


def cold(num_running=1):
    return load(num_free_blocks=90, num_running=num_running)  # F = 90 / max(1, running)


def scaler(min_workers=1, max_workers=4, **kw):
    return Autoscaler(
        min_workers=min_workers,
        max_workers=max_workers,
        scale_up_freeness=10.0,
        scale_down_freeness=60.0,
        cooldown_s=COOLDOWN_S,
        headroom_blocks=0,
        **kw,
    )


def test_scale_up_only_after_the_average_stays_below_the_band_for_the_cooldown():
    s = scaler()
    loads = {"a": hot(), "b": hot()}
    assert s.decide(loads, now=0.0) == []
    assert s.decide(loads, now=COOLDOWN_S - 1) == []
    assert s.decide(loads, now=COOLDOWN_S) == [ScaleUp()]


def test_the_pending_queue_counts_as_demand_spread_over_the_instances():
    s = scaler()
    loads = {"a": warm(), "b": warm()}  # F = 30 each: inside the band
    assert s.decide(loads, now=0.0, pending_demand_blocks=80) == []
    # 80 held blocks: 40 per instance, 20 per running request -> average F 10, not below.
    assert s.decide(loads, now=COOLDOWN_S, pending_demand_blocks=80) == []
    assert s.decide(loads, now=COOLDOWN_S + 1, pending_demand_blocks=100) == []  # F 5: below
    assert s.decide(loads, now=2 * COOLDOWN_S + 1, pending_demand_blocks=100) == [ScaleUp()]
    assert scaler().decide(loads, now=0.0) == []  # without it: inside the band


def test_a_dip_inside_the_band_restarts_the_clock():
    s = scaler()
    s.decide({"a": hot()}, now=0.0)
    s.decide({"a": warm()}, now=5.0)  # back inside the band
    assert s.decide({"a": hot()}, now=12.0) == []
    assert s.decide({"a": hot()}, now=12.0 + COOLDOWN_S) == [ScaleUp()]


def test_one_start_at_a_time_then_cooldown_after_it_registers():
    s = scaler()
    s.decide({"a": hot()}, now=0.0)
    assert s.decide({"a": hot()}, now=10.0) == [ScaleUp()]
    s.started("new", now=10.0)
    assert s.decide({"a": hot()}, now=30.0) == []  # still starting: no second start
    assert s.decide({"a": hot(), "new": hot()}, now=31.0) == []  # registered: cooldown starts over
    assert s.starting == {}
    assert s.decide({"a": hot(), "new": hot()}, now=40.0) == []
    assert s.decide({"a": hot(), "new": hot()}, now=41.0) == [ScaleUp()]


def test_no_scale_up_past_max_workers():
    s = scaler(max_workers=2)
    loads = {"a": hot(), "b": hot()}
    s.decide(loads, now=0.0)
    assert s.decide(loads, now=100.0) == []


def test_min_workers_are_started_at_once():
    s = scaler(min_workers=3)
    assert s.decide({"a": hot()}, now=0.0) == [ScaleUp(), ScaleUp()]
    s.started("x", now=0.0)
    s.started("y", now=0.0)
    assert s.decide({"a": hot()}, now=1.0) == []  # starting ones count toward the minimum


def test_scale_down_drains_the_instance_with_fewest_requests_after_the_cooldown():
    s = scaler()
    loads = {"a": cold(num_running=1), "b": load(num_free_blocks=95), "c": cold(num_running=1)}
    assert s.decide(loads, now=0.0) == []
    assert s.decide(loads, now=COOLDOWN_S) == [Drain("b")]
    assert s.drained_ids == {"b"}


def test_no_drain_below_min_workers():
    s = scaler(min_workers=2)
    loads = {"a": cold(), "b": cold()}
    s.decide(loads, now=0.0)
    assert s.decide(loads, now=100.0) == []


def test_only_removable_instances_are_drained():
    s = scaler()
    loads = {"base": load(num_free_blocks=100), "extra": cold()}
    s.decide(loads, now=0.0, removable={"extra"})
    assert s.decide(loads, now=COOLDOWN_S, removable={"extra"}) == [Drain("extra")]
    s = scaler()
    s.decide(loads, now=0.0, removable=set())
    assert s.decide(loads, now=COOLDOWN_S, removable=set()) == []


def test_drained_instance_is_terminated_once_empty():
    s = scaler()
    loads = {"a": cold(), "b": cold()}
    s.decide(loads, now=0.0)
    [drain] = s.decide(loads, now=COOLDOWN_S)
    victim = drain.instance_id
    other = "b" if victim == "a" else "a"
    still_busy = {other: cold(), victim: load(num_free_blocks=90, num_running=1, draining=True)}
    assert s.decide(still_busy, now=COOLDOWN_S + 1) == []
    migrating = {other: cold(), victim: load(draining=True, num_migrations_out=1)}
    assert s.decide(migrating, now=COOLDOWN_S + 2) == []
    empty = {other: cold(), victim: load(draining=True)}
    assert s.decide(empty, now=COOLDOWN_S + 3) == [Terminate(victim)]
    assert s.decide(empty, now=COOLDOWN_S + 4) == []  # once


def test_cooldown_between_any_two_actions():
    s = scaler()
    loads = {"a": cold(), "b": cold(), "c": cold()}
    s.decide(loads, now=0.0)
    assert len(s.decide(loads, now=COOLDOWN_S)) == 1
    loads = {i: cold() for i in ("a", "b", "c")}
    assert s.decide(loads, now=COOLDOWN_S + 5) == []


def test_draining_instances_do_not_count_toward_the_average():
    s = scaler()
    loads = {"a": hot(), "d": load(num_free_blocks=100, draining=True)}
    s.decide(loads, now=0.0)
    assert s.decide(loads, now=COOLDOWN_S) == [ScaleUp()]


def test_a_start_that_never_registers_is_given_up():
    s = scaler(start_timeout_s=60.0)
    s.started("ghost", now=0.0)
    assert s.decide({"a": warm()}, now=30.0) == []
    assert s.decide({"a": warm()}, now=61.0) == [Terminate("ghost")]
    assert s.starting == {}


def test_a_start_that_crashed_is_forgotten_and_retried():
    s = scaler(min_workers=2)
    assert s.decide({"a": warm()}, now=0.0) == [ScaleUp()]
    s.started("crashed", now=0.0)
    assert s.decide({"a": warm()}, now=1.0) == []
    s.forget("crashed")
    assert s.decide({"a": warm()}, now=2.0) == [ScaleUp()]


def test_too_many_serving_instances_are_drained_to_max():
    s = scaler(max_workers=2)
    loads = {"a": warm(), "b": warm(), "c": load(num_free_blocks=70, num_running=3)}
    assert s.decide(loads, now=0.0) == [Drain("a")]


def test_band_must_be_a_band():
    with pytest.raises(ValueError, match="band"):
        Autoscaler(
            min_workers=1,
            max_workers=2,
            scale_up_freeness=50,
            scale_down_freeness=50,
            cooldown_s=1,
            headroom_blocks=0,
        )
    with pytest.raises(ValueError, match="min_workers"):
        Autoscaler(
            min_workers=3,
            max_workers=2,
            scale_up_freeness=1,
            scale_down_freeness=50,
            cooldown_s=1,
            headroom_blocks=0,
        )


class Provisioner:
    """autoscale_round's provisioner: numbered instances; refuses to stop those in `busy`."""

    def __init__(self):
        self.started, self.stopped, self.busy = [], [], set()

    def start_worker(self):
        self.started.append(f"n{len(self.started)}")
        return WorkerHandle(self.started[-1], pid=0)

    def stop_worker(self, instance_id, *, now):
        if instance_id in self.busy:
            return False
        self.stopped.append(instance_id)
        return True


def test_a_round_starts_drains_and_stops_through_the_provisioner_and_the_core():
    """services/scheduler/autoscale.py autoscale_round, as the scheduler process and the
    simulator run it: the core drains (SetDraining) and forgets; a refused stop is kept."""
    core, prov, s = make_core(), Provisioner(), scaler(min_workers=1, max_workers=4)
    for i, instance_id in enumerate(("a", "b")):
        register(core, instance_id)
        report(core, instance_id, 1, 0.0, num_free_blocks=10, num_running=10 + i)  # hot
    out, actions = autoscale_round(s, core, prov, 0.0)
    out, actions = autoscale_round(s, core, prov, COOLDOWN_S)
    assert (out, actions, prov.started, s.starting) == ([], [ScaleUp()], ["n0"], {"n0": COOLDOWN_S})
    s.forget("n0")
    for instance_id in ("a", "b"):  # cold now
        report(core, instance_id, 2, 20.0, num_free_blocks=90, num_running=1)
    autoscale_round(s, core, prov, 20.0)
    out, actions = autoscale_round(s, core, prov, 20.0 + COOLDOWN_S)
    assert actions == [Drain("a")] and out == [(addr("a"), SetDraining(draining=True))]
    prov.busy.add("a")
    report(core, "a", 3, 31.0, num_free_blocks=100, num_running=0, draining=True)
    assert autoscale_round(s, core, prov, 31.0)[1] == [Terminate("a")]
    assert prov.stopped == [] and core.table.get("a") is not None  # refused: kept
