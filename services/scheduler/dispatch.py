"""Dispatch policies: pick the instance for a new request from the estimated loads of the
candidates (live, not draining, queue not full; the caller filters).

Every policy spreads ties: among the instances with the best score it takes the one after
the last it picked (in id order, wrapping), so equal loads never pile onto one instance.
The caller counts the request into the chosen instance's load before the next choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from ferry.common.wire import LoadFields
from ferry.services.scheduler.load import (
    dispatch_freeness,
    dispatch_rank,
    high_priority_room,
    is_host,
    memory_load,
)

# Scores closer than this are a tie.
TIE_EPS = 1e-9


class DispatchPolicy(Protocol):
    name: str

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False) -> str:
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

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False) -> str:
        return self.rotation.pick(list(loads))


class LeastLoad:
    """INFaaS++-like: lowest physical usage plus queued demand (no migration)."""

    name = "least_load"

    def __init__(self) -> None:
        self.rotation = Rotation()

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False) -> str:
        return self.rotation.pick(_best(loads, lambda load: (0, -memory_load(load))))


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

    def choose(self, loads: Mapping[str, LoadFields], *, high_priority: bool = False) -> str:
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


POLICY_NAMES = (RoundRobin.name, LeastLoad.name, Llumnix.name)


def make_dispatch_policy(name: str, *, headroom_blocks: int) -> DispatchPolicy:
    if name == RoundRobin.name:
        return RoundRobin()
    if name == LeastLoad.name:
        return LeastLoad()
    if name == Llumnix.name:
        return Llumnix(headroom_blocks=headroom_blocks)
    raise ValueError(f"unknown dispatch policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
