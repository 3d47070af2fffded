"""Which request a source instance migrates (the per-request half of the policy; the
scheduler only pairs instances, DESIGN §5)."""

from __future__ import annotations

from collections.abc import Collection

from ferry.common.config import MIGRATION_GROWTH_BLOCKS as GROWTH_BLOCKS
from ferry.services.worker.engine.engine import Engine

CHOICES = ("relief", "shortest")


def pick_request(engine: Engine, busy: Collection[str] = (), *,
                 dst_free_blocks: int = -1, choice: str = "relief") -> str | None:
    """The request to move, given the destination's free blocks (-1: unknown).

    1. The first queued request that fits there: it has no KV to copy and starts at
       once on the freer instance.
    2. Else a running request that fits, low priority first:
       - "relief": the smallest one whose blocks cover what this instance lacks (the
         queue head's demand plus a block of growth per running request, minus the free
         blocks), else the largest: one move frees what the queue head (or the next
         decode steps) need. Ferry's downtime is flat in length (the bulk copy runs while
         the request decodes), so a large request costs bandwidth, not latency;
       - "shortest": Llumnix's rule, the cheapest to copy.
    `busy`: requests already migrating."""
    blocks = engine.blocks

    def fits(num_tokens: int) -> bool:
        return dst_free_blocks < 0 or \
            blocks.blocks_for(num_tokens + 1) + GROWTH_BLOCKS <= dst_free_blocks

    sched = engine.scheduler
    for req in sched.waiting:
        if req.req_id not in busy and fits(req.num_tokens):
            return req.req_id
    candidates = [r for r in sched.running if r.req_id not in busy and fits(r.num_tokens)]
    if not candidates:
        return None
    if choice == "shortest":
        return min(candidates, key=lambda r: (r.priority, r.num_tokens, r.arrival_s)).req_id
    if choice != "relief":
        raise ValueError(f"unknown migration choice {choice!r}; expected one of {CHOICES}")
    lowest = min(r.priority for r in candidates)
    candidates = [r for r in candidates if r.priority == lowest]
    head = sched.waiting[0] if sched.waiting else None
    head_demand = blocks.blocks_for(head.num_tokens) if head is not None else 0
    lacking = head_demand + len(sched.running) - blocks.num_available
    covering = [r for r in candidates if len(r.block_ids) >= lacking]
    if covering:
        return min(covering, key=lambda r: (r.num_tokens, r.arrival_s)).req_id
    return max(candidates, key=lambda r: (r.num_tokens, -r.arrival_s)).req_id
