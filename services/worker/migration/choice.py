"""Which request a source instance migrates (the per-request half of the policy; the
scheduler only pairs instances, DESIGN §5)."""

from __future__ import annotations

from collections.abc import Collection

from services.worker.engine.engine import Engine

# Blocks of headroom a moved request should leave at the destination for its growth.
GROWTH_BLOCKS = 4


def pick_request(engine: Engine, busy: Collection[str] = (), *,
                 dst_free_blocks: int = -1) -> str | None:
    """The request to move, given the destination's free blocks (-1: unknown).

    1. The first queued request that fits there: it has no KV to copy and starts at
       once on the freer instance.
    2. Else the shortest running request that fits, low priority first: cheapest to
       copy, and what it frees here lets the blocked head of the queue start
       (Llumnix's de-fragmentation).
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
    return min(candidates, key=lambda r: (r.priority, r.num_tokens, r.arrival_s)).req_id
