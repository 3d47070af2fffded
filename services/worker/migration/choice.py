"""Which request a source instance migrates (the per-request half of the policy; the
scheduler only pairs instances, DESIGN §5)."""

from __future__ import annotations

from collections.abc import Collection

from services.worker.engine.engine import Engine


def pick_request(engine: Engine, busy: Collection[str] = ()) -> str | None:
    """A queued request if any (no KV to copy: it just starts elsewhere), else the
    shortest running one, low priority first (cheapest to copy, least harm if delayed).
    `busy`: requests already migrating."""
    sched = engine.scheduler
    for req in sched.waiting:
        if req.req_id not in busy:
            return req.req_id
    candidates = [r for r in sched.running if r.req_id not in busy]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.priority, r.num_tokens, r.arrival_s)).req_id
