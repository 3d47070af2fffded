"""Where a policy's preemptions and slowest prefills happen: with the whole cluster full,
or beside an instance with room (fragmentation that placement or migration could have
avoided).

Runs bench.sim on a generated trace and
- at every load report (50 ms), counts each instance's new preemptions with the cluster's
  free blocks and the other instances' free blocks at that moment;
- at every arrival, notes the blocks the request needs to start, the most room any
  instance had for it in the scheduler's view (`dispatch_room`: free minus queued demand)
  and the cluster's free blocks; then classifies the slowest 1% of prefills by them.

    python -m experiments.preemption_sites --kind M-M --rate 132 --seed 0
    python -m experiments.preemption_sites --kind L-L --rate 56 --seed 1 --duration-s 120
"""

from __future__ import annotations

import argparse
import json
import statistics

from experiments.experiment import add_cluster_arguments, generated_trace, simulator_kwargs
from ferry.bench.sim import Simulator
from ferry.common.logging import configure
from ferry.services.scheduler.load import demand_blocks, dispatch_room

ROOMY_OTHER_BLOCKS = 100  # "beside room": the median other instance has this many free


class PreemptionSites(Simulator):
    """The simulator, noting the cluster's state wherever preemptions happened."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[str, int] = {}
        # (new preemptions, cluster free blocks, median free blocks of the other instances)
        self.sites: list[tuple[int, int, int]] = []
        # req_id -> (blocks its prompt needs, most room any instance had, cluster free blocks)
        self.arrivals: dict[str, tuple[int, int, int]] = {}

    def _on_arrival(self, payload) -> None:
        index, entry = payload
        rooms = [dispatch_room(load, headroom_blocks=0) for load in self.core.table.loads().values()]
        cluster_free = sum(i.engine.blocks.num_available for i in self.instances.values() if i.alive)
        need = demand_blocks(int(entry["prompt_tokens"]) + 1, self.block_size)
        self.arrivals[f"r{index}"] = (need, max(rooms, default=0), cluster_free)
        super()._on_arrival(payload)

    @property
    def block_size(self) -> int:
        return next(iter(self.instances.values())).engine.blocks.block_size

    def prefill_latencies(self) -> dict[str, float]:
        return {req_id: r.first_token_s - r.arrival_s for req_id, r in self.records.items()
                if r.first_token_s is not None}

    def _on_report(self, payload) -> None:
        live = [i for i in self.instances.values() if i.alive]
        free = {i.instance_id: i.engine.blocks.num_available for i in live}
        for inst in live:
            count = inst.engine.scheduler.num_preemptions
            new = count - self.seen.get(inst.instance_id, 0)
            self.seen[inst.instance_id] = count
            if new:
                others = sorted(v for k, v in free.items() if k != inst.instance_id)
                self.sites.append((new, sum(free.values()), others[len(others) // 2]))
        super()._on_report(payload)


def classify(sites: list[tuple[int, int, int]], total_blocks: int) -> dict[str, int]:
    """Preemptions by the cluster's free share and by the other instances' room."""
    out = {"total": 0, "cluster_free_below_5pct": 0, "cluster_free_5_to_15pct": 0,
           "cluster_free_above_15pct": 0, "median_other_has_room": 0}
    for new, cluster_free, median_other in sites:
        share = cluster_free / total_blocks
        band = ("cluster_free_below_5pct" if share < 0.05 else
                "cluster_free_5_to_15pct" if share < 0.15 else "cluster_free_above_15pct")
        out["total"] += new
        out[band] += new
        out["median_other_has_room"] += new if median_other >= ROOMY_OTHER_BLOCKS else 0
    return out


def classify_tail(arrivals: dict[str, tuple[int, int, int]], latencies: dict[str, float],
                  total_blocks: int, *, fraction: float = 0.01) -> dict[str, float]:
    """The slowest `fraction` of prefills: how many arrived when no instance had room for
    them in the scheduler's view (every queue already needed more than its free memory),
    and the median cluster free share and demand at their arrival."""
    slowest = sorted(latencies, key=latencies.__getitem__, reverse=True)
    tail = slowest[:max(1, round(len(slowest) * fraction))]
    needs, rooms, frees = zip(*(arrivals[req_id] for req_id in tail), strict=True)
    return {"tail_requests": len(tail),
            "tail_fastest_s": min(latencies[req_id] for req_id in tail),
            "tail_no_room_anywhere": sum(room < need for need, room in zip(needs, rooms,
                                                                            strict=True)),
            "tail_median_need_blocks": statistics.median(needs),
            "tail_median_cluster_free_share": statistics.median(frees) / total_blocks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_arguments(parser, kind="M-M")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure("sim", level="warning")
    trace = generated_trace(args, args.seed)
    report = {}
    for policy in args.policies.split(","):
        sim = PreemptionSites(trace, **simulator_kwargs(policy, args))
        result = sim.run()
        report[policy] = {"p99_prefill_s": result["prefill_latency_s"]["p99"],
                          **classify(sim.sites, args.instances * args.kv_blocks),
                          **classify_tail(sim.arrivals, sim.prefill_latencies(),
                                          args.instances * args.kv_blocks)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
