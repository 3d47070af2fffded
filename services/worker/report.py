"""What a worker tells the scheduler about itself: its Register and its LoadReports, built
from the engine and the worker's own counters. The worker process sends them; the
simulator (bench/sim.py) hands the same messages to its SchedulerCore.
"""

from __future__ import annotations

from collections.abc import Mapping

from ferry.common import wire
from ferry.services.worker.engine.engine import Engine

HELD_LIST_INTERVAL_S = 1.0  # a load report lists the requests held here about this often
# Prefix-cache events one report carries at most; past it, a snapshot of the whole cache.
MAX_CACHE_EVENTS = 16_384


def held_requests(engine: Engine, pulling: Mapping[str, int]) -> dict[str, int]:
    """req_id -> priority of every request the instance holds: in the engine, or waiting
    for its prefix pull (pulling: req_id -> priority)."""
    held = {req_id: req.priority for req_id, req in engine.requests.items()}
    for req_id, priority in pulling.items():
        held.setdefault(req_id, priority)
    return held


def register(engine: Engine, *, instance_id: str, inbox_addr: str, kv_block_bytes: int,
             pulling: Mapping[str, int], model_name: str = "") -> wire.Register:
    """kv_block_bytes: one KV block's bytes as a migration moves it."""
    held = held_requests(engine, pulling)
    return wire.Register(
        instance_id=instance_id,
        inbox_addr=inbox_addr,
        num_blocks=engine.blocks.num_total,
        block_size=engine.blocks.block_size,
        max_model_len=engine.executor.max_model_len,
        req_ids=tuple(held),
        req_priorities=tuple(held.values()),
        prefix_seed=engine.scheduler.prefix_seed or 0,
        model_name=model_name,
        queue_time_bounds_s=engine.scheduler.queue_time.bounds,
        kv_block_bytes=kv_block_bytes,
    )


def load_report(engine: Engine, *, instance_id: str, inbox_addr: str, seq: int,
                report_interval_s: float, num_dispatch_received: int,
                num_migrations_in: int, num_migrations_out: int, draining: bool,
                pulling: Mapping[str, int], snapshot_wanted: bool = False) -> wire.LoadReport:
    """The report numbered seq (1, 2, ...); it takes the engine's prefix-cache events.
    Every HELD_LIST_INTERVAL_S it lists the requests held here; with snapshot_wanted (a
    CacheSnapshotRequest came), or too many events, it carries the whole cache instead."""
    every = max(1, round(HELD_LIST_INTERVAL_S / report_interval_s))
    stored, evicted = engine.blocks.take_events()
    snapshot = None
    if snapshot_wanted or len(stored) + len(evicted) > MAX_CACHE_EVENTS:
        snapshot, stored, evicted = tuple(engine.blocks.cached_hashes()), [], []
    queue_time = engine.scheduler.queue_time
    return wire.LoadReport(
        instance_id=instance_id,
        inbox_addr=inbox_addr,
        seq=seq,
        num_dispatch_received=num_dispatch_received,
        load=engine.load(num_migrations_in=num_migrations_in,
                         num_migrations_out=num_migrations_out, draining=draining),
        req_ids=tuple(held_requests(engine, pulling)) if seq % every == 0 else None,
        cache_stored=tuple(stored), cache_evicted=tuple(evicted), cache_snapshot=snapshot,
        queue_time_counts=queue_time.cumulative(), queue_time_sum_s=queue_time.sum,
    )
