"""The scheduler's pending queue: with `SchedulerConfig.hold_until_room`, a request that no
instance has room to start waits here, not in one instance's queue, and goes to an
instance once the scheduler's load table shows room for it (DESIGN §5).

Why: near the knee the slowest prefills wait in per-instance queues, each behind its own
head, while another instance frees memory first. One queue pools those waits (measured
in the simulator: `bench/results/paper-repro.md`, the pooling experiment).

Pure: entries carry an opaque payload (the process keeps the request's frames in it);
the caller decides where a released request goes (the dispatch policy) and when to try
(after load reports and finish notices, and on a periodic tick).

Invariants:
- at most `capacity` entries (the caller answers 429 past it);
- entries are kept in arrival order per priority; a release scans the oldest `window`
  of each priority, highest first, and takes the first one that fits (first fit: a
  large request at the front does not hold back the small ones behind it; a
  high-priority one goes before normal ones, as the engines' queues order them);
- an entry older than `max_wait_s` is released regardless of room (it then queues at an
  instance, as without holding): nothing waits here without bound, and a request larger
  than any instance's free memory still reaches an engine, which serves or refuses it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ferry.common.histogram import Buckets

# Buckets of the time held requests waited here (ferry:pending_wait_seconds); the longest
# is max_wait_s (5 s by default) plus a tick.
WAIT_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class PendingEntry:
    req_id: str
    demand_blocks: int  # blocks its prompt needs to start (block size of the cluster)
    since_s: float  # when it was held (monotonic)
    payload: Any  # the caller's: the request and its frames
    priority: int = 0  # wire.Priority value; higher goes first


class PendingQueue:
    def __init__(self, *, capacity: int, window: int, max_wait_s: float) -> None:
        if capacity < 1 or window < 1 or not max_wait_s > 0:
            raise ValueError("pending queue: capacity and window >= 1, max_wait_s > 0")
        self.capacity = capacity
        self.window = window
        self.max_wait_s = max_wait_s
        # priority -> its entries in arrival order; no empty ones
        self._by_priority: dict[int, OrderedDict[str, PendingEntry]] = {}
        self._priority_of: dict[str, int] = {}  # req_id -> priority, every entry
        self.demand_blocks = 0  # blocks all held requests need to start
        self.waits = Buckets(WAIT_BOUNDS_S)  # how long each released entry was held

    def __len__(self) -> int:
        return len(self._priority_of)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._priority_of

    @property
    def is_full(self) -> bool:
        return len(self._priority_of) >= self.capacity

    def add(self, entry: PendingEntry) -> None:
        if entry.req_id in self._priority_of:
            raise ValueError(f"request {entry.req_id!r} is already pending")
        if self.is_full:
            raise OverflowError("pending queue is full")
        self._by_priority.setdefault(entry.priority, OrderedDict())[entry.req_id] = entry
        self._priority_of[entry.req_id] = entry.priority
        self.demand_blocks += entry.demand_blocks

    def req_ids(self) -> list[str]:
        """Every held request's id (a copy)."""
        return list(self._priority_of)

    def remove(self, req_id: str) -> PendingEntry | None:
        """Forget a request (its gateway released it): None if it is not here."""
        priority = self._priority_of.pop(req_id, None)
        if priority is None:
            return None
        queue = self._by_priority[priority]
        entry = queue.pop(req_id)
        if not queue:
            del self._by_priority[priority]
        self.demand_blocks -= entry.demand_blocks
        return entry

    def next_release(self, best_room: int, now: float) -> PendingEntry | None:
        """Take the entry to dispatch now, given the most blocks any open instance could
        give a new request (`dispatch_room`): the oldest if it waited max_wait_s, else,
        highest priority first, the first that fits in best_room among the oldest
        `window` of that priority; None if none. O(priorities * window)."""
        if not self._priority_of:
            return None
        oldest = min((next(iter(q.values())) for q in self._by_priority.values()),
                     key=lambda e: e.since_s)
        if now - oldest.since_s >= self.max_wait_s:
            return self._release(oldest, now)
        for priority in sorted(self._by_priority, reverse=True):
            for entry in itertools.islice(self._by_priority[priority].values(), self.window):
                if entry.demand_blocks <= best_room:
                    return self._release(entry, now)
        return None

    def _release(self, entry: PendingEntry, now: float) -> PendingEntry:
        self.remove(entry.req_id)
        self.waits.observe(max(0.0, now - entry.since_s))
        return entry
