"""The one load metric the global policy runs on: virtual usage and freeness (DESIGN §5,
Llumnix Alg. 1). Pure functions of one instance's `LoadFields`.

Virtual usage ΣV of an instance, in KV blocks:

    running requests           -> the blocks they hold: total - free - reserved
    migrations coming in       -> the blocks reserved for them (they will run here)
    head-of-line waiting req   -> the blocks it needs to start; the rest of the queue: 0
    each high-priority running -> + headroom_blocks (keeps spare room so it decodes fast)
    draining instance          -> inf

Freeness F = (M - ΣV) / B with M = total blocks and B = batch size (running requests,
at least 1): the decode steps each running request could still take from free memory.
Summed up, F = (free - head_demand - headroom * num_running_high) / max(1, num_running).
F is negative when the queue already needs more than the free memory; -inf when draining.
Migration pairing, autoscaling and `ferry status` use this F.

Dispatch uses a variant (as Llumnix's implementation does): a new request queues behind
the whole queue, so every waiting request's demand counts, and so does its share of the
batch:

    F_dispatch = (free - queued_demand - headroom * num_running_high) / max(1, running + waiting)

Reports carry the whole queue's demand (waiting_demand_blocks).

F_dispatch alone ignores how much memory is left: an instance with two huge requests and
20 free blocks scores F = 10, above one with 40 requests and 200 free blocks (F = 5), and
the new request lands where the next decode steps preempt. So dispatch ranks first by
whether `dispatch_room` (free - queued demand - headroom, in blocks) is at least
ROOMY_FRACTION of the instance's blocks, then by F_dispatch among the roomy ones, and by
room alone when none is roomy. Measured in the simulator (bench/results/paper-repro.md):
F_dispatch alone with migration off was 2-20x worse on P99 prefill than least_load under
memory pressure; room alone gives up F's balanced batches (1.6x worse P99 decode at low
load); the two together keep both.

Priority-aware placement (dispatch.py) packs high-priority requests onto hosts
(`is_host`) while they have `high_priority_room`.
"""

from __future__ import annotations

import math

from ferry.common.wire import LoadFields

# Largest finite magnitude a freeness takes on the wire (StatusReply: inf travels as this).
WIRE_INF = 1e18


def demand_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks a sequence of num_tokens needs: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


def empty_load(num_blocks: int) -> LoadFields:
    """The load of an instance that has not reported yet: everything free."""
    return LoadFields(
        num_total_blocks=num_blocks,
        num_free_blocks=num_blocks,
        num_reserved_blocks=0,
        num_running=0,
        num_waiting=0,
        head_demand_blocks=0,
        waiting_demand_blocks=0,
        used_blocks_high=0,
        num_running_high=0,
        num_migrations_in=0,
        num_migrations_out=0,
        draining=False,
        step_time_ewma_s=0.0,
        num_preemptions=0,
    )


def used_blocks(load: LoadFields) -> int:
    """Blocks held by running requests (physical usage)."""
    return load.num_total_blocks - load.num_free_blocks - load.num_reserved_blocks


def num_requests(load: LoadFields) -> int:
    return load.num_running + load.num_waiting


def virtual_usage(load: LoadFields, *, headroom_blocks: int) -> float:
    """ΣV in blocks (see the module docstring)."""
    if load.draining:
        return math.inf
    return (
        used_blocks(load)
        + load.num_reserved_blocks
        + load.head_demand_blocks
        + headroom_blocks * load.num_running_high
    )


def freeness(load: LoadFields, *, headroom_blocks: int) -> float:
    """F = (M - ΣV) / B (see the module docstring); -inf for a draining instance."""
    if load.draining:
        return -math.inf
    usage = virtual_usage(load, headroom_blocks=headroom_blocks)
    return (load.num_total_blocks - usage) / max(1, load.num_running)


def queued_demand_blocks(load: LoadFields) -> int:
    """Blocks the whole queue needs to start (reported by the worker)."""
    return load.waiting_demand_blocks


# Dispatch prefers instances whose room is at least this share of their blocks.
ROOMY_FRACTION = 0.05


def dispatch_room(load: LoadFields, *, headroom_blocks: int) -> int:
    """Blocks a new request could still take: free - the queue's demand - headroom."""
    return (
        load.num_free_blocks - queued_demand_blocks(load) - headroom_blocks * load.num_running_high
    )


def empty_room(load: LoadFields) -> int:
    """Blocks a new request could take without evicting a cached prefix: free blocks
    that hold none, less the queue's demand."""
    return load.num_free_blocks - load.num_cached_blocks - queued_demand_blocks(load)


def dispatch_freeness(load: LoadFields, *, headroom_blocks: int) -> float:
    """F_dispatch (see the module docstring); -inf for a draining instance."""
    if load.draining:
        return -math.inf
    room = dispatch_room(load, headroom_blocks=headroom_blocks)
    return room / max(1, load.num_running + load.num_waiting)


def dispatch_rank(load: LoadFields, *, headroom_blocks: int) -> tuple[int, float]:
    """Llumnix dispatch's sort key, higher first (see the module docstring):
    (1, F_dispatch) for a roomy instance, (0, room) otherwise, (-1, 0) when draining."""
    if load.draining:
        return (-1, 0.0)
    room = dispatch_room(load, headroom_blocks=headroom_blocks)
    if room >= ROOMY_FRACTION * load.num_total_blocks:
        return (1, dispatch_freeness(load, headroom_blocks=headroom_blocks))
    return (0, float(room))


def migration_room(load: LoadFields, *, growth_blocks: int, headroom_blocks: int) -> int:
    """Blocks a migration destination can give the moved request and still keep
    growth_blocks for each of its running requests and the newcomer, its queue head's
    demand and its high-priority headroom (>= 0):

        free - head_demand - headroom * num_running_high - growth * (num_running + 1)

    Without the growth term a move could fill the destination to the last block, and its
    batch's next decode steps would preempt there (measured: on S-L near the knee, twice
    the preemptions of no migration at all)."""
    return max(0, load.num_free_blocks - load.head_demand_blocks
               - headroom_blocks * load.num_running_high
               - growth_blocks * (load.num_running + 1))


def is_host(load: LoadFields) -> bool:
    """Runs high-priority requests (llumnix packs them onto such hosts; see dispatch.py)."""
    return load.num_running_high > 0


def high_priority_room(load: LoadFields, *, headroom_blocks: int) -> float:
    """Blocks a host would have left with only its high-priority requests, its queue and
    one more high-priority request, each high-priority request with its headroom:

        total - reserved - used_high - queued_demand - headroom * (num_running_high + 1)

    Its normal requests do not count: new ones go elsewhere and the ones it runs finish
    or migrate. >= 0: the host can take another high-priority request. -inf when
    draining."""
    if load.draining:
        return -math.inf
    return (
        load.num_total_blocks
        - load.num_reserved_blocks
        - load.used_blocks_high
        - queued_demand_blocks(load)
        - headroom_blocks * (load.num_running_high + 1)
    )


def memory_load(load: LoadFields) -> float:
    """least_load's metric (INFaaS++-like): physical usage plus queued demand, as a fraction
    of capacity."""
    held = used_blocks(load) + load.num_reserved_blocks + queued_demand_blocks(load)
    return held / max(1, load.num_total_blocks)


def to_wire(value: float) -> float:
    """Clamp ±inf to ±WIRE_INF for messages that promise a finite number."""
    return max(-WIRE_INF, min(WIRE_INF, value))
