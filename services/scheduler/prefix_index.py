"""Which instance caches which prefix: the scheduler's exact index of the workers' prefix
caches, kept from the events in their load reports (DESIGN §5).

Exact, not approximate: an instance is in the index for a block hash from the report
that says it cached it until the report that says it evicted it (or it dies). A lost
report is noticed by its sequence number; the scheduler then asks the worker for a
snapshot of its whole cache, which replaces that instance's entries.

Memory: one entry per cached block per instance, so bounded by the cluster's KV blocks
(16 instances x 50k blocks, an H200's llama3-8b cache: 800k entries, ~60 MB). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> instances caching it
        self._hashes: dict[str, set[int]] = {}  # instance -> block hashes it caches

    def __len__(self) -> int:
        """Entries: (instance, hash) pairs."""
        return sum(len(h) for h in self._hashes.values())

    def stored(self, instance_id: str, hashes: Iterable[int]) -> None:
        mine = self._hashes.setdefault(instance_id, set())
        for h in hashes:
            mine.add(h)
            self._holders.setdefault(h, set()).add(instance_id)

    def evicted(self, instance_id: str, hashes: Iterable[int]) -> None:
        mine = self._hashes.get(instance_id, set())
        for h in hashes:
            mine.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(instance_id)
                if not holders:
                    del self._holders[h]

    def apply(self, instance_id: str, stored: Iterable[int], evicted: Iterable[int]) -> None:
        """One report's net events (BlockManager.take_events: disjoint sets)."""
        self.stored(instance_id, stored)
        self.evicted(instance_id, evicted)

    def replace(self, instance_id: str, snapshot: Iterable[int]) -> None:
        """The instance's whole cache, as it says now."""
        self.drop(instance_id)
        self.stored(instance_id, snapshot)

    def drop(self, instance_id: str) -> None:
        self.evicted(instance_id, list(self._hashes.pop(instance_id, ())))

    def hits(self, hashes: list[int], instances: Iterable[str]) -> dict[str, int]:
        """For each of `instances`, how many leading blocks of `hashes` it caches (a
        prefix: the first missing block ends it)."""
        out = dict.fromkeys(instances, 0)
        alive = set(out)
        for depth, h in enumerate(hashes):
            alive &= self._holders.get(h, set())
            if not alive:
                break
            for instance_id in alive:
                out[instance_id] = depth + 1
        return out
