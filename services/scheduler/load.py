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
"""

from __future__ import annotations

import math

from common.wire import LoadFields

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


def memory_load(load: LoadFields) -> float:
    """least_load's metric (INFaaS++-like): physical usage plus queued demand, as a fraction
    of capacity. The queue's sizes are unknown beyond its head, so the head's demand stands
    in for each waiting request."""
    queued = load.head_demand_blocks * load.num_waiting
    return (used_blocks(load) + load.num_reserved_blocks + queued) / max(1, load.num_total_blocks)


def to_wire(value: float) -> float:
    """Clamp ±inf to ±WIRE_INF for messages that promise a finite number."""
    return max(-WIRE_INF, min(WIRE_INF, value))
