"""Fixed-size KV blocks: who holds which, and which full blocks hold a known prefix.

Callers see block ids only. Every block is in exactly one of four pools:

    free       ready to allocate, holds nothing anyone can find
    used       ref count >= 1 (requests' tables; a migration pinning it while it is read)
    reserved   set aside for a migration coming in, keyed by migration id
    evictable  ref count 0 but cached: a full block whose prefix hash is known
               (`register`), kept until its memory is needed, least recently freed first

A cached block (used or evictable) is found by its prefix hash (common/prefix_hash.py):
a new request `match`es the longest run of its blocks' hashes and `claim`s those blocks
instead of computing their KV again. Allocation takes free blocks first, then evicts the
least recently freed evictable ones (their hashes are forgotten, and reported by
`take_evicted`). Cached blocks are full and never written again; a request writes only
its own, private, blocks.

Invariant (checked by `check()` and after every step in tests):
    num_free + num_used + num_reserved + num_evictable == num_total
"""

from __future__ import annotations

from collections import OrderedDict, deque


class OutOfBlocks(Exception):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_total = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._num_used = 0
        self._reservations: dict[str, list[int]] = {}
        self._block_of: dict[int, int] = {}  # prefix hash -> the block caching it
        self._hash_of: dict[int, int] = {}  # cached block -> its prefix hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        # hash -> cached (True) or evicted (False), its latest change since take_events
        self._events: dict[int, bool] = {}

    # ---- sizes --------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_reserved(self) -> int:
        return sum(len(b) for b in self._reservations.values())

    @property
    def num_evictable(self) -> int:
        """Cached blocks nobody uses: reclaimable, so they count as free memory."""
        return len(self._evictable)

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take now: free, then evictable."""
        return len(self._free) + len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    # ---- paired verbs -----------------------------------------------------------------

    def can_allocate(self, num_blocks: int, *, claiming: list[int] = ()) -> bool:
        """Whether num_blocks more can be allocated after `claiming` (matched cached
        blocks about to be claimed: those that are evictable leave that pool)."""
        taken = sum(1 for b in claiming if b in self._evictable)
        return num_blocks <= self.num_available - taken

    def allocate(self, num_blocks: int) -> list[int]:
        block_ids = self._take(num_blocks)
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        self._num_used += num_blocks
        return block_ids

    def _take(self, num_blocks: int) -> list[int]:
        """num_blocks out of the free pool, evicting cached blocks when it runs dry."""
        if num_blocks > self.num_available:
            raise OutOfBlocks(f"asked for {num_blocks} blocks, {self.num_available} available")
        taken = [self._free.popleft() for _ in range(min(num_blocks, len(self._free)))]
        while len(taken) < num_blocks:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget(block_id)
            taken.append(block_id)
        return taken

    def append_slot(self, block_ids: list[int], num_tokens: int) -> bool:
        """Grow a request's table in place so it holds num_tokens tokens.
        Returns False (table unchanged) when there are not enough available blocks."""
        missing = self.blocks_for(num_tokens) - len(block_ids)
        if missing <= 0:
            return True
        if not self.can_allocate(missing):
            return False
        block_ids.extend(self.allocate(missing))
        return True

    def incref(self, block_ids: list[int]) -> None:
        """Pin used blocks (a migration reading them) so a free() elsewhere cannot
        hand them out while the read is in flight."""
        for block_id in block_ids:
            if self._ref_counts[block_id] < 1:
                raise ValueError(f"block {block_id} is not in use")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; a block at zero returns to the free pool,
        or, if it is cached, to the evictable pool (most recently freed last)."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count < 1:
                raise ValueError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._num_used -= 1
                if block_id in self._hash_of:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    # ---- the prefix cache -------------------------------------------------------------

    def match(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (nothing is claimed)."""
        found = []
        for h in hashes:
            block_id = self._block_of.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def claim(self, block_ids: list[int]) -> None:
        """Take a reference on matched cached blocks (used or evictable)."""
        for block_id in block_ids:
            if block_id not in self._hash_of:
                raise ValueError(f"block {block_id} is not cached")
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
                self._num_used += 1
            self._ref_counts[block_id] += 1

    def register(self, block_id: int, block_hash: int) -> None:
        """A used block now holds the full block `block_hash`: others may find it. A
        hash cached already (two requests computed the same prefix) keeps its block."""
        if self._ref_counts[block_id] < 1:
            raise ValueError(f"block {block_id} is not in use")
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        self._events[block_hash] = True

    def _forget(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id)
        del self._block_of[block_hash]
        self._events[block_hash] = False

    def take_events(self) -> tuple[list[int], list[int]]:
        """What changed since the last call, net: (hashes cached now, hashes no longer
        cached); disjoint, so their order does not matter (a hash cached and evicted in
        between is only in the second)."""
        events, self._events = self._events, {}
        return ([h for h, cached in events.items() if cached],
                [h for h, cached in events.items() if not cached])

    def cached_hashes(self) -> list[int]:
        """Every hash cached now (a snapshot for the scheduler's index)."""
        return list(self._block_of)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (used or evictable)."""
        return len(self._hash_of)

    # ---- reservations for migrations in -------------------------------------------------

    def reserve(self, key: str, num_blocks: int) -> bool:
        """Set aside num_blocks more available blocks under key; False if not enough."""
        if num_blocks > self.num_available:
            return False
        self._reservations.setdefault(key, []).extend(self._take(num_blocks))
        return True

    def reserved(self, key: str) -> list[int]:
        return list(self._reservations.get(key, ()))

    def take_reserved(self, key: str, num_blocks: int) -> list[int]:
        """Turn the first num_blocks of a reservation into used blocks (ref 1) and return
        the rest to the free pool. The reservation ends."""
        held = self._reservations.pop(key)
        if num_blocks > len(held):
            self._reservations[key] = held
            raise OutOfBlocks(f"reservation {key} holds {len(held)} blocks, {num_blocks} needed")
        taken, rest = held[:num_blocks], held[num_blocks:]
        for block_id in taken:
            self._ref_counts[block_id] = 1
        self._num_used += len(taken)
        self._free.extend(rest)
        return taken

    def release_reservation(self, key: str) -> None:
        """Return a reservation's blocks to the free pool (idempotent)."""
        self._free.extend(self._reservations.pop(key, ()))

    # ---- checks -----------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if the pools are inconsistent."""
        free = set(self._free)
        reserved = [b for held in self._reservations.values() for b in held]
        used = {b for b, c in enumerate(self._ref_counts) if c > 0}
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "a block is twice in the free pool"
        assert len(set(reserved)) == len(reserved), "a block is in two reservations"
        pools = (free, used, set(reserved), evictable)
        assert sum(map(len, pools)) == len(set().union(*pools)), "a block is in two pools"
        assert len(used) == self._num_used, "used count drifted"
        assert evictable <= set(self._hash_of), "an evictable block is not cached"
        assert set(self._hash_of) <= used | evictable, "a cached block is free or reserved"
        assert {self._block_of[h] for h in self._hash_of.values()} == set(self._hash_of)
        assert len(free) + len(used) + len(reserved) + len(evictable) == self.num_total, (
            f"free {len(free)} + used {len(used)} + reserved {len(reserved)} + evictable "
            f"{len(evictable)} != {self.num_total}")
