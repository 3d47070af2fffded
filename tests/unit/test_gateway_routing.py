"""Bypass-mode routing decisions (pure, with an explicit clock)."""

from __future__ import annotations

from ferry.common import wire
from ferry.services.gateway.routing import Routes


def view(*ids: str, epoch: str = "e1") -> wire.InstanceView:
    return wire.InstanceView(
        scheduler_epoch=epoch,
        instances=tuple(wire.InstanceAddr(instance_id=i, inbox_addr=f"tcp://{i}:1") for i in ids),
    )


def test_no_bypass_before_a_first_view():
    routes = Routes(bypass_after_s=3.0, now=100.0)
    assert not routes.bypass
    assert routes.health() == (False, "no instance view from the scheduler yet")
    assert not routes.check(1000.0)  # nothing to bypass to: keep asking the scheduler
    routes.on_view(view(), now=1000.0)
    # a view before any worker registered: nothing can serve yet (a load balancer must wait)
    assert routes.health() == (False, "the scheduler knows no instance that can serve yet")
    routes.on_view(view("a"), now=1000.0)
    assert routes.health() == (True, "scheduler view with 1 instances")
    routes.on_view(view(), now=1000.0)  # the last instance left: not ready again
    assert not routes.health()[0]
    assert not routes.check(1003.0)
    assert routes.check(1003.1)  # switch reported once
    assert routes.bypass and not routes.check(1010.0)
    assert not routes.health()[0]  # bypass with no instances known: not serving


def test_a_view_keeps_normal_mode_and_ends_bypass():
    routes = Routes(bypass_after_s=1.0, now=0.0)
    assert not routes.on_view(view("a", "b"), now=0.5)
    assert routes.health()[0]
    assert not routes.check(1.4)
    assert routes.check(1.6)
    ok, reason = routes.health()
    assert ok and "bypass" in reason
    assert routes.on_view(view("a"), now=2.0)  # the scheduler is back
    assert not routes.bypass


def test_round_robin_over_the_last_view_and_addresses():
    routes = Routes(bypass_after_s=1.0, now=0.0)
    assert routes.next_worker() is None
    routes.on_view(view("a", "b", "c"), now=0.0)
    picks = [routes.next_worker().instance_id for _ in range(6)]
    assert sorted(picks[:3]) == ["a", "b", "c"] and picks[:3] == picks[3:]
    assert routes.addr_of("b") == "tcp://b:1"
    assert routes.addr_of("zz") is None and routes.addr_of(None) is None
    routes.on_view(view(), now=0.1)
    assert routes.next_worker() is None


def test_any_scheduler_message_counts_as_alive():
    routes = Routes(bypass_after_s=1.0, now=0.0)
    routes.on_view(view("a"), now=0.0)
    routes.heard(0.9)  # e.g. a Placement, while views wait behind tokens in the inbox
    assert not routes.check(1.8)
    assert routes.check(2.0)
    routes.heard(2.1)  # only a view ends bypass mode: it brings the instances
    assert routes.bypass


def test_departed_addr_is_a_dead_instances_own_inbox():
    routes = Routes(bypass_after_s=1.0, now=0.0)
    assert routes.departed_addr("a") is None  # no view yet
    routes.on_view(view("a", "b"), now=0.0)
    assert routes.departed_addr("a") == "tcp://a:1"
    assert routes.departed_addr("zz") is None
    shared = wire.InstanceView(scheduler_epoch="e1", instances=(
        wire.InstanceAddr(instance_id="old", inbox_addr="tcp://w:1"),
        wire.InstanceAddr(instance_id="new", inbox_addr="tcp://w:1")))
    routes.on_view(shared, now=0.0)
    assert routes.departed_addr("old") is None  # "new" still uses that socket
