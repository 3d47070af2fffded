"""The scheduler's pending queue (hold_until_room): pure, and through SchedulerCore."""

from __future__ import annotations

import pytest

from ferry.common.wire import DispatchRejected, Placement, Release
from ferry.services.scheduler.core import Pending, Released
from ferry.services.scheduler.pending import PendingEntry, PendingQueue
from tests.unit.test_scheduler_core import GATEWAY, make_core, register, report, request


def entry(req_id, demand, since=0.0):
    return PendingEntry(req_id, demand, since, payload=req_id)


def queue(**kw):
    return PendingQueue(**{"capacity": 8, "window": 4, "max_wait_s": 5.0, **kw})


def test_release_takes_the_first_that_fits_within_the_window():
    q = queue(window=2)
    for req_id, demand in (("big", 50), ("mid", 20), ("small", 5), ("tiny", 1)):
        q.add(entry(req_id, demand))
    assert q.demand_blocks == 76
    assert q.next_release(10, now=1.0) is None  # "small" fits but is past the window of 2
    assert q.next_release(30, now=1.0).req_id == "mid"  # "big" does not hold it back
    assert q.next_release(10, now=1.0).req_id == "small"  # now within the window
    assert q.next_release(100, now=1.0).req_id == "big"  # arrival order among those that fit
    assert q.next_release(100, now=1.0).req_id == "tiny"
    assert q.next_release(100, now=1.0) is None and len(q) == 0


def test_the_oldest_goes_regardless_of_room_once_it_waited_its_longest():
    q = queue(max_wait_s=2.0)
    q.add(entry("old", 500, since=0.0))
    q.add(entry("new", 1, since=1.5))
    assert q.next_release(0, now=1.9) is None
    assert q.next_release(0, now=2.0).req_id == "old"
    assert q.next_release(0, now=2.0) is None  # "new" has waited 0.5 s only


def test_bounds_duplicates_and_removal():
    q = queue(capacity=2)
    q.add(entry("a", 1))
    with pytest.raises(ValueError, match="already pending"):
        q.add(entry("a", 1))
    q.add(entry("b", 1))
    assert q.is_full
    with pytest.raises(OverflowError):
        q.add(entry("c", 1))
    assert q.remove("a").req_id == "a" and q.remove("a") is None
    assert "b" in q and "a" not in q
    with pytest.raises(ValueError):
        PendingQueue(capacity=0, window=1, max_wait_s=1.0)


# ---- through SchedulerCore ------------------------------------------------------------------


def full_cluster(**kw):
    """Two instances of 100 blocks, each reporting 1 free block."""
    core = make_core(hold_until_room=True, **kw)
    for i in ("a", "b"):
        register(core, i)
        report(core, i, 1, 0.0, num_free_blocks=1, num_running=5)
    return core


def test_a_request_no_instance_has_room_for_waits_and_goes_once_a_report_shows_room():
    core = full_cluster()
    held = core.dispatch(request("r1", prompt_len=64), now=0.0, payload=b"frames")
    assert held == Pending("r1")
    assert core.status(0.0).num_pending == 1
    assert "r1" not in core.reqs  # no instance holds it yet
    assert core.release_pending(0.1) == ([], [])
    report(core, "b", 2, 0.2, num_free_blocks=40, num_running=4)
    placed, out = core.release_pending(0.2)
    assert placed == [Released("b", request("r1", prompt_len=64), b"frames")] and out == []
    assert core.reqs["r1"].instance_id == "b" and core.status(0.2).num_pending == 0
    # Counted into b's estimated load: the next one does not fit there any more.
    assert core.dispatch(request("r2", prompt_len=64 * 10), now=0.3) == Pending("r2")


def test_a_request_that_fits_somewhere_is_placed_at_once():
    core = full_cluster()
    report(core, "a", 2, 0.0, num_free_blocks=50, num_running=3)
    assert core.dispatch(request("r1", prompt_len=64), now=0.0) == "a"
    core = make_core(hold_until_room=False)
    for i in ("a", "b"):
        register(core, i)
        report(core, i, 1, 0.0, num_free_blocks=1, num_running=5)
    assert core.dispatch(request("r2")) in ("a", "b")  # without holding: queued at one


def test_releasing_a_pending_request_forgets_it_without_an_abort():
    core = full_cluster()
    core.dispatch(request("r1"), now=0.0)
    assert core.release(Release(req_id="r1", reason="abort")) == []
    report(core, "a", 2, 0.1, num_free_blocks=90)
    assert core.release_pending(0.1) == ([], [])


def test_pending_requests_go_after_the_max_wait_or_are_refused_with_no_instance():
    core = full_cluster(pending_max_wait_s=1.0)
    core.dispatch(request("r1"), now=0.0)
    placed, _ = core.release_pending(1.0)
    assert [p.req.req_id for p in placed] == ["r1"]  # to an instance, room or not
    core.dispatch(request("r2"), now=2.0)
    core.terminate("a", 2.0)
    core.terminate("b", 2.0)
    placed, out = core.release_pending(3.0)
    assert placed == [] and len(out) == 1
    to, rejected = out[0]
    assert to == GATEWAY and isinstance(rejected, DispatchRejected) and rejected.code == 503


def test_a_full_pending_queue_answers_429():
    core = full_cluster(max_pending=1)
    core.dispatch(request("r1"), now=0.0)
    rejected = core.dispatch(request("r2"), now=0.0)
    assert isinstance(rejected, DispatchRejected) and rejected.code == 429
    assert "pending queue is full" in rejected.message


def test_placement_messages_are_the_process_job():
    # release_pending returns placements, not Placement messages: the process forwards the
    # frames first and tells the gateway only once they are sent (as for a direct dispatch).
    core = full_cluster(pending_max_wait_s=0.5)
    core.dispatch(request("r1"), now=0.0)
    placed, out = core.release_pending(1.0)
    assert len(placed) == 1 and not any(isinstance(m, Placement) for _, m in out)


def test_a_request_sent_twice_is_not_placed_twice():
    core = full_cluster()
    assert core.dispatch(request("r1"), now=0.0) == Pending("r1")
    assert core.dispatch(request("r1"), now=0.1) == Pending("r1")  # held once
    assert len(core.pending) == 1
    report(core, "a", 2, 0.2, num_free_blocks=90)
    placed, _ = core.release_pending(0.2)
    assert [p.req.req_id for p in placed] == ["r1"]
    assert core.dispatch(request("r1"), now=0.3) == Pending("r1")  # placed: ignored
    assert core.counters.num_dispatched == 1


def test_high_priority_requests_are_released_first():
    q = queue(window=2)
    q.add(entry("n1", 5))
    q.add(entry("n2", 5))
    q.add(PendingEntry("h1", 50, 0.0, "h1", priority=1))
    q.add(PendingEntry("h2", 5, 0.0, "h2", priority=1))
    assert q.next_release(10, now=1.0).req_id == "h2"  # past the window of all, not of high
    assert q.next_release(10, now=1.0).req_id == "n1"  # h1 does not fit: normal ones go
    assert q.next_release(60, now=1.0).req_id == "h1"
