"""Fixed-size KV blocks: who holds which, and nothing else.

Callers see block ids only. Every block is in exactly one of three pools:

    free      ready to allocate
    used      ref count >= 1 (a request's table; a migration pinning it while it is read)
    reserved  set aside for a migration coming in, keyed by migration id

Invariant (checked by `check()` and after every step in tests):
    num_free + num_used + num_reserved == num_total
"""

from __future__ import annotations

from collections import deque


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

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    # ---- paired verbs -----------------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocks(f"asked for {num_blocks} blocks, {len(self._free)} free")
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        self._num_used += num_blocks
        return block_ids

    def append_slot(self, block_ids: list[int], num_tokens: int) -> bool:
        """Grow a request's table in place so it holds num_tokens tokens.
        Returns False (table unchanged) when there are not enough free blocks."""
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
        """Drop one reference from each block; a block at zero returns to the free pool."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count < 1:
                raise ValueError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._num_used -= 1
                self._free.append(block_id)

    # ---- reservations for migrations in -------------------------------------------------

    def reserve(self, key: str, num_blocks: int) -> bool:
        """Set aside num_blocks more free blocks under key; False if not enough free."""
        if num_blocks > len(self._free):
            return False
        held = self._reservations.setdefault(key, [])
        held.extend(self._free.popleft() for _ in range(num_blocks))
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
        assert len(free) == len(self._free), "a block is twice in the free pool"
        assert len(set(reserved)) == len(reserved), "a block is in two reservations"
        assert not (free & used) and not (free & set(reserved)) and not (used & set(reserved))
        assert len(used) == self._num_used, "used count drifted"
        assert len(free) + len(used) + len(reserved) == self.num_total, (
            f"free {len(free)} + used {len(used)} + reserved {len(reserved)} != {self.num_total}"
        )
