"""Migration pairing (DESIGN §5, Llumnix §4.4): every period, pair the instances that need
relief with the freest ones. The scheduler decides only the pair; the source worker picks
which request moves (shortest running, low priority first).

A migration hook is any function from the estimated loads of the live instances to a list
of decisions; the scheduler runs its hooks every `migration_interval_s` and issues each
decision through the same checks as `ferry migrate`. `pair_migrations` is the default one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ferry.common.wire import LoadFields
from ferry.services.scheduler.load import freeness


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    src_instance_id: str
    dst_instance_id: str
    req_id: str | None = None  # None: the source picks


MigrationHook = Callable[[Mapping[str, LoadFields]], Iterable[MigrationDecision]]


def is_source(load: LoadFields, f: float, *, threshold: float) -> bool:
    """Needs relief: draining and holding requests, F below the threshold, or a queue
    (waiting or preempted requests: head demand > 0). Only running requests can move."""
    if load.num_running == 0:
        return False
    return load.draining or f < threshold or load.head_demand_blocks > 0


def pair_migrations(
    loads: Mapping[str, LoadFields],
    *,
    threshold: float,
    margin: float,
    max_per_instance: int,
    headroom_blocks: int,
) -> list[MigrationDecision]:
    """Pair the lowest-F sources with the highest-F destinations, one pair per instance.

    - sources: `is_source`; ordered by F ascending (draining first: F = -inf);
    - destinations: not draining, nothing queued, F >= threshold + margin, not a source;
      ordered by F descending;
    - each pair needs F(dst) - F(src) >= margin, so that moving one request does not make
      the destination a source at once (no ping-pong);
    - an instance already in max_per_instance migrations (in + out, as reported or as
      issued by the scheduler) takes no part.
    Ties are ordered by instance id, so the result is deterministic.
    """
    f = {i: freeness(load, headroom_blocks=headroom_blocks) for i, load in loads.items()}
    free_slots = {
        i: load.num_migrations_in + load.num_migrations_out < max_per_instance
        for i, load in loads.items()
    }
    sources = sorted(
        (
            i
            for i, load in loads.items()
            if free_slots[i] and is_source(load, f[i], threshold=threshold)
        ),
        key=lambda i: (f[i], i),
    )
    taken = set(sources)
    destinations = sorted(
        (
            i
            for i, load in loads.items()
            if free_slots[i]
            and i not in taken
            and not load.draining
            and load.head_demand_blocks == 0
            and load.num_waiting == 0
            and f[i] >= threshold + margin
        ),
        key=lambda i: (-f[i], i),
    )
    decisions = []
    for src, dst in zip(sources, destinations, strict=False):
        # Sources ascend and destinations descend in F: once a gap is too small, so are the rest.
        if f[dst] - f[src] < margin:
            break
        decisions.append(MigrationDecision(src_instance_id=src, dst_instance_id=dst))
    return decisions
