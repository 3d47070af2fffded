"""The instance table: what the scheduler knows of each instance, and the load it counts
on top of the last report for the dispatches that report had not seen yet.

Why count at dispatch time: reports arrive every ~50 ms; a policy that reads only the last
report sends every request of a burst to the same "least loaded" instance. So each
Dispatch adds its demand to the chosen instance at once, and a report supersedes only
the dispatches it has counted:

    dispatches sent to I:   d0 d1 d2 d3 d4        (num_dispatch_sent = 5)
    report says received:   3                     (num_dispatch_received - dispatch_base)
    estimate = report + [d3 d4]                   (the unseen ones stay on top)

`dispatch_base` aligns the worker's counter with ours: it is 0 for a fresh registration
and moves up whenever the worker has counted more dispatches than we sent (gateways in
bypass mode, or a worker that outlived a scheduler restart), so that the excess is read
as "already in the report", never as "nothing unseen" forever after.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from ferry.common.wire import LoadFields, LoadReport, Register
from ferry.services.scheduler.load import empty_load

# Unseen dispatches kept per instance at most; beyond it the oldest (the first a report
# would supersede) are forgotten. Reached only by an instance that stopped reporting.
MAX_UNSEEN_DISPATCHES = 65_536


@dataclass(frozen=True, slots=True)
class UnseenDispatch:
    req_id: str
    demand_blocks: int  # ceil(prompt_len / block_size), less its cached prefix blocks there
    high_priority: bool
    prefill_tokens: int = 0  # tokens it will prefill there (its prompt less the cached part)


@dataclass(slots=True)
class Instance:
    instance_id: str
    inbox_addr: str
    num_blocks: int  # KV capacity
    block_size: int  # tokens per block
    max_model_len: int
    last_heard_s: float  # monotonic time of the last Register or LoadReport
    prefix_seed: int = 0  # its prefix cache's hash seed; 0: it caches no prefix
    kv_block_bytes: int = 0  # bytes of one of its KV blocks; 0: unknown
    alive: bool = True
    draining: bool = False  # the scheduler told it to drain (SetDraining)
    report: LoadFields | None = None  # last LoadReport's load; None until the first
    report_seq: int = -1
    num_dispatch_sent: int = 0  # Dispatches this scheduler forwarded since registration
    dispatch_base: int = 0  # worker's num_dispatch_received that matches our count 0
    unseen: deque[UnseenDispatch] = field(
        default_factory=lambda: deque(maxlen=MAX_UNSEEN_DISPATCHES)
    )
    num_migrations_out: int = 0  # MigrateOut issued with this source, MigrationDone pending
    num_migrations_in: int = 0  # same, with this destination
    estimate: LoadFields | None = None  # InstanceTable.load() cached; None: recompute
    # For /metrics (services/scheduler/metrics.py), read at scrape time only:
    model_name: str = ""  # Register.model_name
    queue_time_bounds_s: tuple[float, ...] = ()  # Register's; the counts below fit them
    queue_time_counts: tuple[int, ...] = ()  # the last report's, cumulative (LoadReport)
    queue_time_sum_s: float = 0.0


class InstanceTable:
    def __init__(self) -> None:
        self._instances: dict[str, Instance] = {}

    # ---- membership ---------------------------------------------------------------------

    def register(self, msg: Register, now: float) -> Instance:
        """(Re)start the record of an instance: a fresh worker, or one answering ReRegister
        after a scheduler restart. Counters start over (see the module docstring)."""
        inst = Instance(
            instance_id=msg.instance_id,
            inbox_addr=msg.inbox_addr,
            num_blocks=msg.num_blocks,
            block_size=msg.block_size,
            max_model_len=msg.max_model_len,
            last_heard_s=now,
            prefix_seed=msg.prefix_seed,
            model_name=msg.model_name,
            queue_time_bounds_s=msg.queue_time_bounds_s,
            kv_block_bytes=msg.kv_block_bytes,
        )
        self._instances[msg.instance_id] = inst
        return inst

    def mark_dead(self, instance_id: str) -> None:
        inst = self._instances[instance_id]
        inst.alive = False
        inst.unseen.clear()
        inst.num_migrations_in = inst.num_migrations_out = 0
        inst.estimate = None

    def remove(self, instance_id: str) -> None:
        self._instances.pop(instance_id, None)

    def set_draining(self, instance_id: str, draining: bool = True) -> None:
        inst = self._instances[instance_id]
        inst.draining = draining
        inst.estimate = None

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def __getitem__(self, instance_id: str) -> Instance:
        return self._instances[instance_id]

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._instances

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def __len__(self) -> int:
        return len(self._instances)

    # ---- reports --------------------------------------------------------------------------

    def apply_report(self, msg: LoadReport, now: float) -> bool:
        """Take a LoadReport of a live, known instance. False when the instance is unknown or
        dead (the caller asks it to re-register); a stale or repeated report (seq not
        increasing) is dropped but still counts as a heartbeat."""
        inst = self._instances.get(msg.instance_id)
        if inst is None or not inst.alive:
            return False
        inst.last_heard_s = now
        if msg.seq <= inst.report_seq:
            return True
        inst.report_seq = msg.seq
        inst.report = msg.load
        inst.estimate = None
        inst.queue_time_counts, inst.queue_time_sum_s = msg.queue_time_counts, msg.queue_time_sum_s
        seen = msg.num_dispatch_received - inst.dispatch_base
        if seen > inst.num_dispatch_sent:
            inst.dispatch_base = msg.num_dispatch_received - inst.num_dispatch_sent
            seen = inst.num_dispatch_sent
        num_unseen = inst.num_dispatch_sent - seen
        while len(inst.unseen) > num_unseen:
            inst.unseen.popleft()
        return True

    def silent_since(self, deadline_s: float) -> list[str]:
        """Live instances not heard from since deadline_s (heartbeat missed)."""
        return [
            i.instance_id
            for i in self._instances.values()
            if i.alive and i.last_heard_s < deadline_s
        ]

    # ---- load counted by the scheduler itself --------------------------------------------

    def record_dispatch(self, instance_id: str, dispatch: UnseenDispatch) -> None:
        inst = self._instances[instance_id]
        inst.num_dispatch_sent += 1
        inst.unseen.append(dispatch)
        if inst.estimate is not None:  # O(1) update: dispatch is the hot path
            inst.estimate = with_dispatch(inst.estimate, dispatch)

    def cancel_last_dispatch(self, instance_id: str) -> None:
        """Undo the latest record_dispatch (the forward could not be sent)."""
        inst = self._instances[instance_id]
        inst.num_dispatch_sent -= 1
        inst.estimate = None
        if inst.unseen:
            inst.unseen.pop()

    def start_migration(self, src_instance_id: str, dst_instance_id: str) -> None:
        src, dst = self._instances[src_instance_id], self._instances[dst_instance_id]
        src.num_migrations_out += 1
        dst.num_migrations_in += 1
        src.estimate = dst.estimate = None

    def end_migration(self, src_instance_id: str, dst_instance_id: str) -> None:
        for instance_id, attr in (
            (src_instance_id, "num_migrations_out"),
            (dst_instance_id, "num_migrations_in"),
        ):
            inst = self._instances.get(instance_id)
            if inst is not None:
                setattr(inst, attr, max(0, getattr(inst, attr) - 1))
                inst.estimate = None

    # ---- the estimate the policies read ---------------------------------------------------

    def load(self, instance_id: str) -> LoadFields:
        """The last report, plus the dispatches it had not seen (`with_dispatch`), the
        migrations the scheduler issued and the drain it ordered."""
        inst = self._instances[instance_id]
        if inst.estimate is None:
            base = inst.report or empty_load(inst.num_blocks)
            load = functools.reduce(with_dispatch, inst.unseen, base)
            inst.estimate = dataclasses.replace(
                load,
                num_migrations_in=max(load.num_migrations_in, inst.num_migrations_in),
                num_migrations_out=max(load.num_migrations_out, inst.num_migrations_out),
                draining=load.draining or inst.draining,
            )
        return inst.estimate

    def loads(self, *, serving_only: bool = False) -> dict[str, LoadFields]:
        """Estimated loads of the live instances, by id; serving_only leaves out draining
        ones (no new work goes there)."""
        loads = {
            i.instance_id: self.load(i.instance_id) for i in self._instances.values() if i.alive
        }
        if serving_only:
            loads = {i: load for i, load in loads.items() if not load.draining}
        return loads


def with_dispatch(load: LoadFields, dispatch: UnseenDispatch) -> LoadFields:
    """`load` after one more dispatch. It is assumed admitted (running, its blocks taken)
    when nothing is queued ahead of it and its prompt fits in the free blocks; otherwise it
    waits, and the first to wait becomes the head-of-line demand."""
    demand = dispatch.demand_blocks
    prefill = load.pending_prefill_tokens + dispatch.prefill_tokens
    if load.num_waiting == 0 and demand <= load.num_free_blocks:
        high = dispatch.high_priority
        return dataclasses.replace(
            load,
            num_free_blocks=load.num_free_blocks - demand,
            num_running=load.num_running + 1,
            used_blocks_high=load.used_blocks_high + (demand if high else 0),
            num_running_high=load.num_running_high + (1 if high else 0),
            pending_prefill_tokens=prefill,
        )
    return dataclasses.replace(
        load,
        num_waiting=load.num_waiting + 1,
        head_demand_blocks=load.head_demand_blocks if load.num_waiting else demand,
        waiting_demand_blocks=load.waiting_demand_blocks + demand,
        pending_prefill_tokens=prefill,
    )
