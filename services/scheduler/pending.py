"""The scheduler's pending queue: with `SchedulerConfig.hold_until_room`, a request that no
instance has room to start waits here, not in one instance's queue, and goes to an
instance once the scheduler's load table shows room for it (DESIGN §5).

Why: near the knee the slowest prefills wait in per-instance queues, each behind its own
head, while another instance frees memory first. One queue pools those waits (measured
in the simulator: `bench/central_queue.py`, `bench/results/paper-repro.md`).

Pure: entries carry an opaque payload (the process keeps the request's frames in it);
the caller decides where a released request goes (the dispatch policy) and when to try
(after load reports and finish notices, and on a periodic tick).

Invariants:
- at most `capacity` entries (the caller answers 429 past it);
- entries are in arrival order; a release scans the first `window` of the high-priority
  ones, then the first `window` of all, and takes the first one that fits (first fit: a
  large request at the front does not hold back the small ones behind it; a
  high-priority one goes before normal ones as the engines' queues order them);
- an entry older than `max_wait_s` is released regardless of room (it then queues at an
  instance, as without holding): nothing waits here without bound, and a request larger
  than any instance's free memory still reaches an engine, which serves or refuses it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


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
        self._entries: OrderedDict[str, PendingEntry] = OrderedDict()  # arrival order

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._entries

    @property
    def is_full(self) -> bool:
        return len(self._entries) >= self.capacity

    @property
    def demand_blocks(self) -> int:
        """Blocks all held requests need to start."""
        return sum(e.demand_blocks for e in self._entries.values())

    def add(self, entry: PendingEntry) -> None:
        if entry.req_id in self._entries:
            raise ValueError(f"request {entry.req_id!r} is already pending")
        if self.is_full:
            raise OverflowError("pending queue is full")
        self._entries[entry.req_id] = entry

    def remove(self, req_id: str) -> PendingEntry | None:
        """Forget a request (its gateway released it): None if it is not here."""
        return self._entries.pop(req_id, None)

    def next_release(self, best_room: int, now: float) -> PendingEntry | None:
        """Take the entry to dispatch now, given the most blocks any open instance could
        give a new request (`dispatch_room`): the oldest if it waited max_wait_s, else the
        first that fits in best_room among the first `window` high-priority entries, then
        among the first `window` of all; None if none."""
        if not self._entries:
            return None
        oldest = next(iter(self._entries.values()))
        if now - oldest.since_s >= self.max_wait_s:
            return self._entries.pop(oldest.req_id)
        priorities = {e.priority for e in self._entries.values()}
        levels = (max(priorities), None) if len(priorities) > 1 else (None,)
        for level in levels:  # None: every priority
            scanned = 0
            for entry in self._entries.values():
                if level is not None and entry.priority != level:
                    continue
                if scanned >= self.window:
                    break
                scanned += 1
                if entry.demand_blocks <= best_room:
                    return self._entries.pop(entry.req_id)
        return None
