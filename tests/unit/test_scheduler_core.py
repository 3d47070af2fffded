"""SchedulerCore without sockets: placements, releases, failures, migrations, status."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from ferry.common.config import Endpoint, SchedulerConfig
from ferry.common.wire import (
    Abort,
    Dispatch,
    DispatchRejected,
    InstanceDown,
    InstanceView,
    LoadReport,
    MigrateOut,
    MigrationDone,
    Placement,
    Priority,
    Register,
    Release,
    ReRegister,
    SetDraining,
)
from ferry.services.scheduler.core import (
    MIGRATION_LOST_AFTER_S,
    Pending,
    SchedulerCore,
    SchedulerError,
)
from ferry.services.scheduler.load import empty_load, migration_room
from ferry.services.scheduler.migration import MigrationDecision

GATEWAY = "tcp://gateway:1"


def config(**kw):
    ep = Endpoint(bind="tcp://127.0.0.1:0", advertise="tcp://127.0.0.1:0")
    kw.setdefault("startup_grace_s", 0.0)  # the grace has tests of its own
    return SchedulerConfig(inbox=ep, admin=ep, **kw)


def make_core(**kw):
    return SchedulerCore(config(**kw), epoch="e1")


def addr(instance_id):
    return f"tcp://{instance_id}:1"


def register(core, instance_id, num_blocks=100, now=0.0, req_ids=()):
    return core.register(
        Register(
            instance_id=instance_id,
            inbox_addr=addr(instance_id),
            num_blocks=num_blocks,
            block_size=16,
            max_model_len=4096,
            req_ids=req_ids,
        ),
        now,
    )


def report(core, instance_id, seq, now, received=0, **fields):
    load = dataclasses.replace(empty_load(100), **fields)
    return core.load_report(
        LoadReport(
            instance_id=instance_id,
            inbox_addr=addr(instance_id),
            seq=seq,
            num_dispatch_received=received,
            load=load,
        ),
        now,
    )


def request(req_id, prompt_len=32, priority=Priority.NORMAL, gateway=GATEWAY):
    """A Dispatch's header: all the core reads (its body never reaches the core)."""
    return Dispatch(req_id=req_id, attempt=0, priority=priority, reply_addr=gateway,
                    prompt_len=prompt_len, prefix_hashes=(), body=b"")


def done(migration_id, req_id, src, dst, committed=True, reason=""):
    return MigrationDone(
        migration_id=migration_id,
        req_id=req_id,
        src_instance_id=src,
        dst_instance_id=dst,
        committed=committed,
        reason=reason,
        num_stages=2,
        num_blocks=4,
        num_bytes=1024,
        total_s=0.1,
        downtime_s=0.01,
    )


def types_to(out, address):
    return [type(msg) for a, msg in out if a == address]


# ---- dispatch -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "llumnix"])
def test_dispatch_spreads_and_records_placements(policy):
    core = make_core(dispatch_policy=policy)
    for i in range(4):
        register(core, f"w{i}")
    chosen = [core.dispatch(request(f"r{n}")) for n in range(20)]
    assert collections.Counter(chosen) == {f"w{i}": 5 for i in range(4)}
    assert {r.req_id: r.instance_id for r in core.status(0.0).requests} == {
        f"r{n}": c for n, c in enumerate(chosen)
    }


def test_dispatch_tells_the_policy_the_priority():
    # With a headroom, high-priority requests share a host and normal ones go elsewhere.
    core = make_core(dispatch_policy="llumnix", high_priority_headroom_blocks=10)
    for i in range(3):
        register(core, f"w{i}")
    high = {core.dispatch(request(f"h{n}", priority=Priority.HIGH)) for n in range(3)}
    normal = {core.dispatch(request(f"n{n}")) for n in range(4)}
    assert len(high) == 1 and not high & normal


def test_dispatch_without_instances_is_503_and_with_full_queues_429():
    core = make_core(max_queued_per_instance=2)
    rejected = core.dispatch(request("r0"))
    assert isinstance(rejected, DispatchRejected) and rejected.code == 503
    register(core, "w0")
    report(
        core,
        "w0",
        seq=1,
        now=0.1,
        num_free_blocks=0,
        num_running=5,
        num_waiting=2,
        head_demand_blocks=3,
    )
    rejected = core.dispatch(request("r1"))
    assert isinstance(rejected, DispatchRejected) and rejected.code == 429
    assert core.counters.num_rejected == 2


def test_draining_and_dead_instances_get_no_dispatch():
    core = make_core()
    for i in range(3):
        register(core, f"w{i}")
    core.drain("w0")
    core.expire(0.0)
    core.table["w1"].last_heard_s = -100.0
    core.expire(0.0)
    assert {core.dispatch(request(f"r{n}")) for n in range(5)} == {"w2"}
    assert [i.instance_id for i in core.instance_view().instances] == ["w2"]


def test_undo_dispatch_forgets_the_request_and_answers_429():
    core = make_core()
    register(core, "w0")
    placed = core.dispatch(request("r0"))
    rejected = core.undo_dispatch(request("r0"), placed, "queue full")
    assert rejected.code == 429
    assert core.reqs == {} and core.table.load("w0") == empty_load(100)


def test_a_new_gateway_gets_the_view_at_once():
    core = make_core()
    register(core, "w0")
    [(address, view)] = core.see_gateway(GATEWAY, 0.0)
    assert address == GATEWAY and isinstance(view, InstanceView) and view.scheduler_epoch == "e1"
    assert core.see_gateway(GATEWAY, 0.0) == []
    assert core.broadcast_view(0.0) == [(GATEWAY, view)]


# ---- release --------------------------------------------------------------------------------


def test_release_aborts_on_the_holder_unless_finished():
    core = make_core()
    register(core, "w0")
    core.dispatch(request("r0"))
    core.dispatch(request("r1"))
    assert core.release(Release(req_id="r0", reason="finished")) == []
    assert core.release(Release(req_id="r1", reason="abort")) == [
        (addr("w0"), Abort(req_id="r1", reason="abort"))
    ]
    assert core.release(Release(req_id="never-seen", reason="abort")) == []
    assert core.reqs == {}


# ---- failures and re-registration -------------------------------------------------------


def test_heartbeat_timeout_tells_gateways_and_drops_the_requests():
    core = make_core(heartbeat_timeout_s=2.0)
    register(core, "w0", now=0.0)
    register(core, "w1", now=0.0)
    core.see_gateway(GATEWAY, 0.0)
    core.see_gateway("tcp://gateway2:1", 0.0)
    placed = {req_id: core.dispatch(request(req_id)) for req_id in ("r0", "r1", "r2")}
    report(core, "w1", seq=1, now=1.5)
    assert core.expire(now=1.9) == []
    out = core.expire(now=2.1)
    assert sorted(out) == sorted(
        [
            (GATEWAY, InstanceDown(instance_id="w0")),
            ("tcp://gateway2:1", InstanceDown(instance_id="w0")),
        ]
    )
    assert {r.req_id for r in core.status(2.1).requests} == {
        r for r, i in placed.items() if i == "w1"
    }
    assert core.expire(now=2.2) == []  # declared once
    assert [i.alive for i in core.status(2.2).instances] == [False, True]
    assert core.take_departed() == [addr("w0")]  # the process closes its socket there
    assert core.take_departed() == []


def test_report_from_an_unknown_instance_asks_it_to_register_again():
    core = make_core(heartbeat_timeout_s=2.0)
    out = report(core, "w9", seq=100, now=0.0)
    assert out == [(addr("w9"), ReRegister(scheduler_epoch="e1"))]
    assert report(core, "w9", seq=101, now=0.5) == []  # not more often than timeout / 2
    assert report(core, "w9", seq=102, now=1.1) == out
    assert register(core, "w9", now=1.2, req_ids=("a", "b")) == []
    assert {r.req_id: r.instance_id for r in core.status(1.2).requests} == {"a": "w9", "b": "w9"}
    assert report(core, "w9", seq=103, now=1.3) == []


def test_an_instance_declared_dead_that_comes_back_aborts_what_it_held():
    core = make_core(heartbeat_timeout_s=1.0)
    register(core, "w0", now=0.0)
    core.dispatch(request("r0"))
    core.expire(now=5.0)
    assert report(core, "w0", seq=9, now=5.1) == [(addr("w0"), ReRegister(scheduler_epoch="e1"))]
    out = register(core, "w0", now=5.2, req_ids=("r0",))
    assert out == [(addr("w0"), Abort(req_id="r0", reason="instance was declared down"))]
    assert core.reqs == {}
    assert core.dispatch(request("r1")) == "w0"  # alive again


def test_a_worker_that_restarted_empty_is_reported_down_first():
    core = make_core()
    core.see_gateway(GATEWAY, 0.0)
    register(core, "w0", now=0.0)
    core.dispatch(request("r0"))
    out = register(core, "w0", now=1.0)  # same id, holds nothing: it lost r0
    assert out == [(GATEWAY, InstanceDown(instance_id="w0"))]
    assert core.reqs == {}
    assert core.table["w0"].alive
    # Its old socket (queued messages for the process that died) goes; the process
    # closes it before sending `out`, so what goes to the new one opens a new socket.
    assert core.take_departed() == [addr("w0")]


# ---- migrations ---------------------------------------------------------------------------


def overloaded_pair(core, now=0.0):
    register(core, "hot", now=now)
    register(core, "cold", now=now)
    report(core, "hot", seq=1, now=now, num_free_blocks=2, num_running=10)  # F 0.2
    report(core, "cold", seq=1, now=now, num_free_blocks=90, num_running=1)  # F 90


def test_rebalance_issues_migrate_out_to_the_source_up_to_the_bound():
    core = make_core(max_migrations_per_instance=2)
    overloaded_pair(core)
    first = core.rebalance(now=0.0)
    [(address, msg)] = first
    assert address == addr("hot")
    assert isinstance(msg, MigrateOut) and msg.req_id is None
    assert (msg.dst_instance_id, msg.dst_inbox_addr) == ("cold", addr("cold"))
    assert len(core.rebalance(now=0.2)) == 1
    assert core.rebalance(now=0.4) == []  # two in flight on each side: the bound
    core.migration_done(
        done(msg.migration_id, "x", "hot", "cold", committed=False, reason="dst out of memory")
    )
    assert len(core.rebalance(now=0.6)) == 1


def test_least_load_never_migrates():
    core = make_core(dispatch_policy="least_load")
    overloaded_pair(core)
    assert core.migration_policy is None and core.rebalance(now=0.0) == []


def test_migration_can_be_disabled():
    core = make_core(enable_migration=False)
    overloaded_pair(core)
    assert core.rebalance(now=0.0) == []


def test_a_custom_policy_issues_migrations_through_the_same_checks():
    core = make_core(enable_migration=False)
    overloaded_pair(core)
    core.migration_policy = (
        lambda loads: [MigrationDecision("cold", "hot", "r7"), MigrationDecision("cold", "nowhere")]
    )
    [(address, msg)] = core.rebalance(now=0.0)
    assert address == addr("cold") and msg.req_id == "r7" and msg.dst_instance_id == "hot"


def test_committed_migration_moves_the_placement_and_tells_the_gateway():
    core = make_core(dispatch_policy="round_robin")
    register(core, "a")
    register(core, "b")
    assert core.dispatch(request("r0")) == "a"
    migration_id, out = core.migrate_request("r0", "b", now=0.0)
    assert out == [
        (
            addr("a"),
            MigrateOut(
                migration_id=migration_id,
                dst_instance_id="b",
                dst_inbox_addr=addr("b"),
                req_id="r0",
                dst_free_blocks=100,  # the scheduler's view of b: empty, 100 blocks
            ),
        )
    ]
    out = core.migration_done(done(migration_id, "r0", "a", "b"))
    assert out == [(GATEWAY, Placement(req_id="r0", instance_id="b"))]
    status = core.status(0.0)
    assert [(r.req_id, r.instance_id) for r in status.requests] == [("r0", "b")]
    assert (status.num_migrations_committed, status.num_migrations_aborted) == (1, 0)
    assert core.release(Release(req_id="r0", reason="abort")) == [
        (addr("b"), Abort(req_id="r0", reason="abort"))
    ]


def test_aborted_migrations_are_counted_by_reason():
    core = make_core()
    register(core, "a")
    register(core, "b")
    core.dispatch(request("r0"))
    for reason in ("dst out of memory", "dst out of memory", "request finished"):
        migration_id, _ = core.migrate(MigrationDecision("a", "b"), now=0.0)
        assert (
            core.migration_done(done(migration_id, "r0", "a", "b", committed=False, reason=reason))
            == []
        )
    status = core.status(0.0)
    assert status.num_migrations_aborted == 3
    assert status.abort_reasons == {"dst out of memory": 2, "request finished": 1}
    assert core.migrations == {}


def test_a_request_released_while_it_migrated_is_stopped_on_the_destination():
    core = make_core(dispatch_policy="round_robin")
    register(core, "a")
    register(core, "b")
    core.dispatch(request("r0"))
    migration_id, _ = core.migrate_request("r0", "b", now=0.0)
    core.release(Release(req_id="r0", reason="abort"))
    assert core.migration_done(done(migration_id, "r0", "a", "b")) == [
        (addr("b"), Abort(req_id="r0", reason="released"))
    ]
    assert core.reqs == {}


def test_migrate_request_errors():
    core = make_core(dispatch_policy="round_robin")
    register(core, "a")
    register(core, "b")
    core.dispatch(request("r0"))
    with pytest.raises(SchedulerError) as err:
        core.migrate_request("nope", "b", now=0.0)
    assert err.value.code == 404
    with pytest.raises(SchedulerError) as err:
        core.migrate_request("r0", "zzz", now=0.0)
    assert err.value.code == 404
    with pytest.raises(SchedulerError) as err:
        core.migrate_request("r0", "a", now=0.0)
    assert err.value.code == 409
    core.drain("b")
    with pytest.raises(SchedulerError, match="draining") as err:
        core.migrate_request("r0", "b", now=0.0)
    assert core.migrations == {}


def test_a_migration_that_never_reports_is_counted_lost_and_frees_its_slot():
    core = make_core(max_migrations_per_instance=1)
    overloaded_pair(core)
    assert len(core.rebalance(now=0.0)) == 1
    assert core.rebalance(now=1.0) == []
    for instance_id in ("hot", "cold"):  # keep both alive
        report(
            core,
            instance_id,
            seq=2,
            now=MIGRATION_LOST_AFTER_S + 1,
            num_free_blocks=2,
            num_running=10,
        )
    core.expire(now=MIGRATION_LOST_AFTER_S + 1)
    assert core.counters.abort_reasons == {"no MigrationDone": 1}


def test_source_dying_aborts_its_migration():
    core = make_core(heartbeat_timeout_s=1.0)
    overloaded_pair(core)
    core.rebalance(now=0.0)
    report(core, "cold", seq=2, now=1.5, num_free_blocks=90, num_running=1)
    core.expire(now=1.6)
    assert core.counters.abort_reasons == {"source instance down": 1}
    assert core.table["cold"].num_migrations_in == 0


def test_drain_sends_set_draining_and_terminate_forgets():
    core = make_core()
    core.see_gateway(GATEWAY, 0.0)
    register(core, "w0")
    register(core, "w1")
    assert core.drain("w0") == [(addr("w0"), SetDraining(draining=True))]
    assert core.table.load("w0").draining
    assert core.terminate("w0", now=1.0) == []
    assert "w0" not in core.table
    core.dispatch(request("r0"))
    assert core.terminate("w1", now=1.0) == [(GATEWAY, InstanceDown(instance_id="w1"))]
    assert core.take_departed() == [addr("w0"), addr("w1")]
    assert core.terminate("w1", now=1.0) == [] and core.take_departed() == []


def test_a_departed_instance_keeps_the_socket_of_a_live_one_at_its_address():
    """A new instance took the inbox address of one that is then declared dead (a worker
    restarted under a new id): the socket there is the new one's, so it stays open."""
    core = make_core(heartbeat_timeout_s=1.0)
    register(core, "old", now=0.0)
    core.register(Register(instance_id="new", inbox_addr=addr("old"), num_blocks=100,
                           block_size=16, max_model_len=4096, req_ids=()), 0.9)
    core.expire(now=1.5)
    assert not core.table["old"].alive and core.table["new"].alive
    assert core.take_departed() == []


def test_status_shows_estimated_loads_and_freeness():
    core = make_core(high_priority_headroom_blocks=5)
    register(core, "w0")
    core.dispatch(request("r0", prompt_len=33, priority=Priority.HIGH))  # 3 blocks
    [inst] = core.status(now=0.5).instances
    assert inst.load.num_free_blocks == 97 and inst.load.num_running_high == 1
    assert inst.freeness == pytest.approx(100 - 3 - 5)
    assert inst.last_report_age_s == 0.5
    assert core.status(0.5).requests[0].priority == Priority.HIGH


def test_rebalancing_leaves_the_destination_room_for_its_batch_to_grow():
    """Periodic pairing tells the source how much the destination can take: its free
    blocks less growth room for each running request and the newcomer; `ferry migrate`
    may use every free block."""
    core = make_core(migrate_dst_growth_blocks=4)
    overloaded_pair(core)  # cold: 90 free, 1 running
    [(_, periodic)] = core.rebalance(now=0.0)
    assert periodic.dst_free_blocks == 90 - 4 * 2
    _, [(_, manual)] = core.migrate(MigrationDecision("hot", "cold"), now=0.0)
    assert manual.dst_free_blocks == 90


def test_migration_room_counts_the_queue_head_and_headroom_and_is_never_negative():
    load = dataclasses.replace(empty_load(100), num_free_blocks=60, head_demand_blocks=10,
                               num_running=3, num_running_high=1)
    assert migration_room(load, growth_blocks=4, headroom_blocks=8) == 60 - 10 - 8 - 4 * 4
    assert migration_room(load, growth_blocks=20, headroom_blocks=8) == 0


# ---- gateway liveness, start-up grace, reconciling, forgetting the dead ---------------------


def hello(core, now, prefix, gateway=GATEWAY):
    return core.see_gateway(gateway, now, req_id_prefix=prefix)


def test_a_silent_gateway_is_gone_and_the_workers_drop_its_requests():
    from ferry.common.wire import GatewayGone

    core = make_core(gateway_timeout_s=10.0, heartbeat_timeout_s=100.0)
    register(core, "w0")
    register(core, "w1")
    hello(core, 0.0, "gw-aa-")
    hello(core, 0.0, "gw2-bb-", gateway="tcp://gateway2:1")
    core.dispatch(request("gw-aa-0"), now=0.0)
    core.dispatch(request("gw2-bb-0", gateway="tcp://gateway2:1"), now=0.0)
    hello(core, 9.0, "gw2-bb-", gateway="tcp://gateway2:1")
    assert core.expire(now=9.5) == []
    out = core.expire(now=10.5)
    gone = GatewayGone(inbox_addr=GATEWAY, req_id_prefix="gw-aa-")
    assert sorted(out) == sorted([(addr("w0"), gone), (addr("w1"), gone)])
    assert set(core.reqs) == {"gw2-bb-0"} and GATEWAY not in core.gateways


def test_a_restarted_gateway_makes_the_old_process_requests_orphans():
    from ferry.common.wire import GatewayGone

    core = make_core()
    register(core, "w0")
    hello(core, 0.0, "gw-aa-")
    core.dispatch(request("gw-aa-0"), now=0.0)
    assert hello(core, 1.0, "gw-aa-") == []
    out = hello(core, 2.0, "gw-cc-")  # same inbox, new process
    assert out == [(addr("w0"), GatewayGone(inbox_addr=GATEWAY, req_id_prefix="gw-aa-"))]
    assert core.reqs == {}


def test_a_restarted_scheduler_sends_no_view_and_holds_requests_during_its_grace():
    core = make_core(startup_grace_s=2.0)
    assert hello(core, 0.1, "gw-aa-") == []  # a new gateway, but no view yet
    assert core.broadcast_view(1.0) == []
    assert core.dispatch(request("r0"), now=1.0) == Pending("r0")  # not "no live instance"
    register(core, "w0", now=1.2)
    report(core, "w0", seq=1, now=1.25)
    placed, _ = core.release_pending(1.25)
    assert [p.instance_id for p in placed] == ["w0"]
    [(gateway, view)] = core.broadcast_view(2.1)
    assert gateway == GATEWAY and [i.instance_id for i in view.instances] == ["w0"]
    core.table.mark_dead("w0")
    assert core.dispatch(request("r1"), now=2.2).code == 503  # past the grace: refused


def test_reconciling_drops_phantoms_adopts_the_unknown_and_re_aborts_the_released():
    core = make_core()
    register(core, "w0", now=0.0)
    core.dispatch(request("r-gone"), now=0.0)  # its Release was lost: a phantom
    core.dispatch(request("r-new"), now=9.9)  # just sent: not in the worker's list yet
    core.release(Release(req_id="r-released", reason="abort"))

    def listing(now, *req_ids):
        return core.load_report(LoadReport(
            instance_id="w0", inbox_addr=addr("w0"), seq=int(now * 10),
            num_dispatch_received=0, load=empty_load(100), req_ids=req_ids), now)

    assert listing(10.0, "r-adopt") == []
    assert set(core.reqs) == {"r-gone", "r-new", "r-adopt"}  # left out once: not yet
    out = listing(11.0, "r-adopt", "r-released")
    assert out == [(addr("w0"), Abort(req_id="r-released", reason="released"))]
    assert set(core.reqs) == {"r-new", "r-adopt"}  # r-new is too young to judge
    assert core.reqs["r-adopt"].instance_id == "w0"


def test_a_dead_instance_leaves_status_but_is_remembered():
    from ferry.services.scheduler.core import DEAD_SHOWN_S

    core = make_core(heartbeat_timeout_s=1.0)
    register(core, "w0", now=0.0)
    core.dispatch(request("r0"), now=0.0)
    core.expire(now=2.0)
    assert [i.alive for i in core.status(2.0).instances] == [False]
    core.expire(now=2.0 + DEAD_SHOWN_S + 1)
    assert core.status(40.0).instances == ()
    # back much later, still holding r0 (replayed elsewhere long ago): it must drop it
    out = register(core, "w0", now=100.0, req_ids=("r0",))
    assert out == [(addr("w0"), Abort(req_id="r0", reason="instance was declared down"))]


def test_evacuation_moves_everything_off_and_reports_drained():
    core = make_core(max_migrations_per_instance=2)
    for instance_id in ("w0", "w1", "w2"):
        register(core, instance_id)
    report(core, "w0", seq=1, now=0.0, num_running=3, num_waiting=2, num_free_blocks=10)
    report(core, "w1", seq=1, now=0.0, num_free_blocks=90)
    report(core, "w2", seq=1, now=0.0, num_free_blocks=60)
    assert core.evacuate("w0") == [(addr("w0"), SetDraining(draining=True))]
    assert core.evacuate("w0") == []  # idempotent (a stopping worker repeats Leaving)
    out = core.evacuation(now=0.1)
    assert [(a, m.dst_instance_id) for a, m in out] == [(addr("w0"), "w1"), (addr("w0"), "w2")]
    assert core.evacuation(now=0.2) == []  # two at a time
    assert not core.is_drained("w0")
    for migration_id in list(core.migrations):
        core.migration_done(MigrationDone(
            migration_id=migration_id, req_id="x", src_instance_id="w0",
            dst_instance_id="w1", committed=True, reason="", num_blocks=1, num_stages=1,
            num_bytes=64, total_s=0.01, downtime_s=0.003))
    report(core, "w0", seq=2, now=0.3, num_running=0, num_waiting=0, draining=True)
    assert core.is_drained("w0") and core.evacuation(now=0.4) == []
    assert "w0" not in core.table.loads(serving_only=True)
    assert core.cancel_drain("w0") == [(addr("w0"), SetDraining(draining=False))]
    report(core, "w0", seq=3, now=0.5)
    assert "w0" in core.table.loads(serving_only=True)


def test_a_worker_leaving_is_evacuated_then_forgotten_at_once():
    from ferry.common.wire import Leaving

    core = make_core()
    core.see_gateway(GATEWAY, 0.0)
    register(core, "w0")
    register(core, "w1")
    core.dispatch(request("r0"), now=0.0)  # on w0 (round robin of equals: the first)
    held_by = core.reqs["r0"].instance_id
    assert core.leaving(Leaving(instance_id=held_by, done=False), now=1.0) == [
        (addr(held_by), SetDraining(draining=True))]
    assert held_by in core.evacuating
    # it exits with r0 still there (drain timeout): the gateway replays it now
    out = core.leaving(Leaving(instance_id=held_by, done=True), now=2.0)
    assert out == [(GATEWAY, InstanceDown(instance_id=held_by))]
    assert core.table.get(held_by) is None and held_by not in core.evacuating
