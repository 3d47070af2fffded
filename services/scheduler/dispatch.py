"""Dispatch policies: pick the instance for a new request from the estimated loads of the
candidates (live, not draining, queue not full; the caller filters) and what is known of
the request (`Demand`: its length and how much of its prefix each instance caches).

Every policy spreads ties: among the instances with the best score it takes the one after
the last it picked (in id order, wrapping), so equal loads never pile onto one instance.
The caller counts the request into the chosen instance's load before the next choice.

Policies: round_robin; least_load (INFaaS++-like, lowest memory use); infaas (the
Llumnix paper's baseline as its artifact runs it: the highest dispatch freeness, no
migration); prefix_affinity (llm-d's precise prefix-cache scoring: cached prefix share,
queue and KV use, weighted 3:1:1); llumnix (freeness among roomy instances, priorities,
migration); ferry (the lowest expected time to first token: the prefill tokens queued
ahead plus the request's uncached tokens, at the instance's measured prefill rate, among
roomy instances; migration as llumnix's; and prefix pulls: a free instance copies the
cached prefix from a busy one when the copy beats computing it, `Ferry.place`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ferry.common.wire import LoadFields
from ferry.services.scheduler.load import (
    dispatch_freeness,
    dispatch_rank,
    dispatch_room,
    empty_room,
    high_priority_room,
    is_host,
    memory_load,
)

# Scores closer than this are a tie.
TIE_EPS = 1e-9
# prefix_affinity's weights: llm-d's default scheduling profile (prefix-cache-scorer 3,
# queue-scorer 1, kv-cache-utilization scorer 1; gateway-api-inference-extension's
# EndpointPickerConfig, with a max-score picker).
PREFIX_WEIGHT, QUEUE_WEIGHT, KV_WEIGHT = 3.0, 1.0, 1.0
# ferry's prefill rate for an instance that has not measured one yet (tokens/s): the
# fastest any candidate measured, else this.
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
# A prefix pull's fixed cost on top of bytes / bandwidth: its four control messages and
# the group's launch (seconds).
PULL_OVERHEAD_S = 2e-3
# A pull may evict the destination's cached prefixes only up to this share of its KV (a
# copy into empty blocks is always allowed): see Ferry._best_pull.
PULL_EVICT_FRACTION = 0.01


@dataclass(frozen=True, slots=True)
class Demand:
    """What a policy may know of the request it places."""

    num_tokens: int = 0  # prompt, plus outputs replayed
    block_size: int = 16
    num_prefix_blocks: int = 0  # full blocks it sent prefix hashes for
    cached_blocks: Mapping[str, int] = field(default_factory=dict)  # instance -> leading
    # blocks of its prefix that instance caches (from the scheduler's prefix index)
    # Prefix pulls: the same for every live instance, candidate or not (a busy or full one
    # may be the source of a copy), and the bytes of one KV block (0: unknown, no pulls).
    held_blocks: Mapping[str, int] = field(default_factory=dict)
    kv_block_bytes: int = 0

    def uncached_tokens(self, instance_id: str) -> int:
        return max(0, self.num_tokens - self.cached_blocks.get(instance_id, 0) * self.block_size)

    @property
    def max_hit_blocks(self) -> int:
        """Blocks of the prefix a cache can serve: an engine always computes the last
        token (its logits sample the first output), so never a block holding it."""
        return max(0, (self.num_tokens - 1) // self.block_size)


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a request goes, and whether it first copies its prefix there (a pull)."""

    instance_id: str
    pull_src: str | None = None  # the instance to copy the cached prefix blocks from
    num_pull_blocks: int = 0  # the prefix's leading blocks the destination will hold


class DispatchPolicy(Protocol):
    name: str

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        """The instance id for the next request (high_priority: a high-priority one; only
        llumnix with a headroom tells them apart); loads is non-empty."""
        ...


class Rotation:
    """Round-robin over whichever ids are offered: the first id after the last pick."""

    def __init__(self) -> None:
        self.last_id: str | None = None

    def pick(self, instance_ids: list[str]) -> str:
        ordered = sorted(instance_ids)
        after = [i for i in ordered if self.last_id is None or i > self.last_id]
        self.last_id = (after or ordered)[0]
        return self.last_id


def _best(
    loads: Mapping[str, LoadFields], score: Callable[[LoadFields], tuple[int, float]]
) -> list[str]:
    """Ids of the instances with the highest (tier, value) score: the top tier, and in it
    the values within TIE_EPS of the best."""
    scores = {instance_id: score(load) for instance_id, load in loads.items()}
    top_tier, top = max(scores.values())
    return [i for i, (tier, s) in scores.items() if tier == top_tier and s >= top - TIE_EPS]


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self.rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        return self.rotation.pick(list(loads))


class LeastLoad:
    """INFaaS++-like: lowest physical usage plus queued demand (no migration)."""

    name = "least_load"

    def __init__(self) -> None:
        self.rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        return self.rotation.pick(_best(loads, lambda load: (0, -memory_load(load))))


class Infaas:
    """The Llumnix paper's INFaaS++ baseline as its artifact (AlibabaPAI/llumnix, branch
    osdi24ae) runs it: Llumnix's own dispatch freeness, the highest, with migration off:

        F = (free - all queued blocks) / (running + waiting)

    No room tier: an instance with few requests and no memory can win (weaker than
    least_load under memory pressure; DESIGN §5)."""

    name = "infaas"

    def __init__(self) -> None:
        self.rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        return self.rotation.pick(
            _best(loads, lambda load: (0, dispatch_freeness(load, headroom_blocks=0))))


class PrefixAffinity:
    """llm-d's precise prefix-cache-aware scheduling, as its default profile scores an
    endpoint (each scorer in [0, 1], the weighted sum maximised):

        3 * cached prefix blocks / prompt blocks
      + 1 * queue score: (max queue - queue) / (max queue - min queue) over the candidates,
            1 when all are equal (queue: waiting requests)
      + 1 * (1 - KV cache use)

    The longest cached prefix wins unless the load terms outweigh it; no migration."""

    name = "prefix_affinity"

    def __init__(self) -> None:
        self.rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        queues = {i: load.num_waiting for i, load in loads.items()}
        low, high = min(queues.values()), max(queues.values())

        def score(instance_id: str, load: LoadFields) -> float:
            prefix = (demand.cached_blocks.get(instance_id, 0) / demand.num_prefix_blocks
                      if demand.num_prefix_blocks else 0.0)
            queue = (high - queues[instance_id]) / (high - low) if high > low else 1.0
            kv_use = 1.0 - load.num_free_blocks / max(1, load.num_total_blocks)
            return PREFIX_WEIGHT * prefix + QUEUE_WEIGHT * queue + KV_WEIGHT * (1.0 - kv_use)

        scores = {i: score(i, load) for i, load in loads.items()}
        top = max(scores.values())
        return self.rotation.pick([i for i, s in scores.items() if s >= top - TIE_EPS])


class Ferry:
    """The lowest expected time to first token, among the instances with room for the
    request (its memory need less the blocks of its prefix each caches; when none has
    room, the most room):

        ttft(i) = (prefill tokens pending at i + the request's tokens i does not cache)
                  / i's measured prefill rate  +  one step of i

    (pending: the queued requests' prompts less their cached prefixes, and unfed chunks,
    as the worker reports them, plus what was dispatched there since; an instance that
    has not measured its rate or step yet counts the best rate and the slowest step
    measured among the candidates)

    so a long cached prefix wins where it saves more than the queue in front of it costs,
    and a hot prefix does not pile onto one busy instance. Ties (equal estimates, e.g. no
    cache anywhere and empty queues) go to the highest dispatch freeness (llumnix's).

    Prefix pulls (kv_bandwidth_bytes_s > 0): the instance s holding the longest cached
    prefix (h blocks) may be busy while another, d, is free. d can copy the blocks it
    lacks from s before it queues the request:

        copy(d)      = PULL_OVERHEAD_S + (h - cached at d) * block bytes / bandwidth
        ttft_pull(d) = max(copy(d), pending at d / rate)   (d's queue drains meanwhile)
                       + (tokens - h * block size) / rate  +  one step of d

    A pull to d is an option only where the copy is cheaper than computing those blocks
    there (copy(d) < (h - cached at d) * block size / d's rate), d has room, and the copy
    and the request evict at most PULL_EVICT_FRACTION of d's KV in cached prefixes (what
    does not fit in empty_room): a copy that evicts d's cached prefixes trades other
    sessions' hits for this one's. With scarce KV (multi-turn, 8 x 1000 blocks, 5 seeds)
    unrestricted pulls cut the hit rate from 0.84 to 0.73 and raised the median P99 TTFT
    from 69 ms (no pulls) to 115 ms; with the limit: 0.83 and 69 ms
    (bench/results/prefix-sweep/README.md). It is taken
    when its ttft_pull is the lowest of every option, placing without a pull (on s
    itself, or anywhere else) included, ties going to no pull. Among sources holding
    equally long prefixes, ties rotate."""

    name = "ferry"

    def __init__(self, *, kv_bandwidth_bytes_s: float = 0.0) -> None:
        self.kv_bandwidth_bytes_s = kv_bandwidth_bytes_s  # 0: no pulls
        self.rotation = Rotation()
        self.source_rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        return self.place(loads, demand=demand).instance_id

    def place(self, loads: Mapping[str, LoadFields], *, demand: Demand = Demand()) -> Choice:
        known = [load.prefill_tokens_per_s for load in loads.values() if load.prefill_tokens_per_s]
        fallback = max(known, default=DEFAULT_PREFILL_TOKENS_PER_S)
        # An instance that has not stepped yet counts the slowest step measured (with 0 it
        # would win every close call, and pull prefixes from idle holders for nothing).
        step_fallback = max((load.step_time_ewma_s for load in loads.values()), default=0.0)

        def rate(load: LoadFields) -> float:
            return load.prefill_tokens_per_s or fallback

        def step(load: LoadFields) -> float:
            return load.step_time_ewma_s or step_fallback

        def need(instance_id: str) -> int:
            return -(-demand.uncached_tokens(instance_id) // demand.block_size) + 1

        def score(instance_id: str, load: LoadFields) -> tuple[int, float, float]:
            room = dispatch_room(load, headroom_blocks=0)
            if room < need(instance_id):
                return (0, float(room), 0.0)
            queued = load.pending_prefill_tokens
            ttft = (queued + demand.uncached_tokens(instance_id)) / rate(load) + step(load)
            return (1, -ttft, dispatch_freeness(load, headroom_blocks=0))

        scores = {i: score(i, load) for i, load in loads.items()}
        tier, top, _ = max(scores.values())
        pull = self._best_pull(loads, demand, rate, step, need) if tier == 1 else None
        if pull is not None and pull[1] < -top - 1e-6:
            return pull[0]
        close = {i: s for i, s in scores.items() if s[0] == tier and s[1] >= top - 1e-6}
        best_f = max(s[2] for s in close.values())
        return Choice(self.rotation.pick([i for i, s in close.items()
                                          if s[2] >= best_f - TIE_EPS]))

    def _best_pull(self, loads: Mapping[str, LoadFields], demand: Demand, rate, step, need
                   ) -> tuple[Choice, float] | None:
        """The pull with the lowest expected TTFT, and that TTFT; None if no pull is
        cheaper than computing the blocks it would copy."""
        if not self.kv_bandwidth_bytes_s or not demand.kv_block_bytes:
            return None
        held = {i: min(n, demand.max_hit_blocks) for i, n in demand.held_blocks.items()}
        longest = max(held.values(), default=0)
        if longest <= 0:
            return None
        block_s = demand.kv_block_bytes / self.kv_bandwidth_bytes_s
        options: dict[str, tuple[float, float]] = {}  # dst -> (ttft, freeness)
        for dst, load in loads.items():
            num_copy = longest - demand.cached_blocks.get(dst, 0)
            if num_copy <= 0:  # (a source itself among them)
                continue
            if dispatch_room(load, headroom_blocks=0) < need(dst):
                continue
            evicted = need(dst) - max(0, empty_room(load))  # need counts the copy too
            if evicted > PULL_EVICT_FRACTION * load.num_total_blocks:
                continue  # the copy would evict too many of d's cached prefixes
            copy_s = PULL_OVERHEAD_S + num_copy * block_s
            if copy_s >= num_copy * demand.block_size / rate(load):
                continue  # computing them there is cheaper
            rest = max(0, demand.num_tokens - longest * demand.block_size)
            ttft = (max(copy_s, load.pending_prefill_tokens / rate(load))
                    + rest / rate(load) + step(load))
            options[dst] = (ttft, dispatch_freeness(load, headroom_blocks=0))
        if not options:
            return None
        best = min(t for t, _ in options.values())
        close = {i: f for i, (t, f) in options.items() if t <= best + 1e-6}
        best_f = max(close.values())
        dst = self.rotation.pick([i for i, f in close.items() if f >= best_f - TIE_EPS])
        src = self.source_rotation.pick([i for i, n in held.items() if n == longest])
        return Choice(dst, pull_src=src, num_pull_blocks=longest), options[dst][0]


class Llumnix:
    """Highest dispatch freeness among the instances with room, else the most room
    (virtual usage with the whole queue and high-priority headroom; `dispatch_rank` in
    load.py), with priority-aware placement when the headroom is > 0.

    A high-priority request decodes faster in a small batch (a step's time grows with the
    batch), so high-priority requests are packed onto a few instances that normal requests
    keep away from. Hosts are the instances running high-priority requests:

    - a high-priority request goes to the freest host with room for it
      (`high_priority_room` >= 0); when no host has room, to the freest instance of all,
      which becomes a host;
    - a normal request goes to the freest instance that is not a host, as long as one can
      take it without queueing beyond its free memory (F_dispatch >= 0); when none can,
      to the freest instance of all.

    The headroom sizes the hosts: a host takes about M / (blocks a request holds +
    headroom) high-priority requests before the next host opens, and its headroom keeps it
    from looking free to migration. With no headroom, priorities play no part in placement.
    Ties spread (Rotation), among hosts as among the others.
    """

    name = "llumnix"

    def __init__(self, *, headroom_blocks: int) -> None:
        self.headroom_blocks = headroom_blocks
        self.rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False,
               demand: Demand = Demand()) -> str:
        candidates: Mapping[str, LoadFields] = loads
        if self.headroom_blocks > 0:
            place = self._hosts_with_room if high_priority else self._open_non_hosts
            candidates = place(loads) or loads
        return self.rotation.pick(_best(candidates, self._score))

    def _score(self, load: LoadFields) -> tuple[int, float]:
        return dispatch_rank(load, headroom_blocks=self.headroom_blocks)

    def _hosts_with_room(self, loads: Mapping[str, LoadFields]) -> dict[str, LoadFields]:
        headroom = self.headroom_blocks
        return {
            i: load
            for i, load in loads.items()
            if is_host(load) and high_priority_room(load, headroom_blocks=headroom) >= 0
        }

    def _open_non_hosts(self, loads: Mapping[str, LoadFields]) -> dict[str, LoadFields]:
        headroom = self.headroom_blocks
        return {
            i: load
            for i, load in loads.items()
            if not is_host(load) and dispatch_freeness(load, headroom_blocks=headroom) >= 0
        }


POLICY_NAMES = (RoundRobin.name, LeastLoad.name, Infaas.name, PrefixAffinity.name,
                Llumnix.name, Ferry.name)
# The policies that come with Llumnix's migration pairing (the others only place).
MIGRATING_POLICIES = (Llumnix.name, Ferry.name)


def make_dispatch_policy(name: str, *, headroom_blocks: int,
                         kv_bandwidth_bytes_s: float = 0.0) -> DispatchPolicy:
    """kv_bandwidth_bytes_s: the KV copy rate between instances ferry's prefix pulls
    assume (0: no pulls)."""
    simple = {RoundRobin.name: RoundRobin, LeastLoad.name: LeastLoad, Infaas.name: Infaas,
              PrefixAffinity.name: PrefixAffinity}
    if name == Ferry.name:
        return Ferry(kv_bandwidth_bytes_s=kv_bandwidth_bytes_s)
    if name in simple:
        return simple[name]()
    if name == Llumnix.name:
        return Llumnix(headroom_blocks=headroom_blocks)
    raise ValueError(f"unknown dispatch policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
