"""What pooling the queues would gain: requests wait in one central queue and go to an
instance only once it can start them at once.

Near the knee the slowest prefills wait in per-instance queues (bench.preemption_sites).
A central queue pools those waits (one M/G/c queue instead of c separate ones). This is
the simulator experiment that led to the scheduler's pending queue
(services/scheduler/pending.py, `hold_until_room`, which `bench.sim --hold-until-room`
runs as it is); here held requests are released the
moment some instance's room covers one, scanning the first WINDOW held requests in
arrival order (first fit: a large request at the front does not block the small ones
behind it), and the policy then places the released request as usual. Releases are
tried on each arrival, each load report and each step's end (standing in for the finish
notices a scheduler gets). The room is read

- `--view true`: from the engines' state (free blocks less their own queue and the
  admission watermark);
- `--view reported`: from the scheduler's load table (the 50 ms reports plus what it
  dispatched since, `dispatch_room`): what a real scheduler could run. It releases more
  eagerly (stale free blocks, no watermark), and measured no worse than `true`.

    python -m ferry.bench.central_queue --kind L-L --rate 56 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math

from ferry.bench.experiment import add_cluster_arguments, generated_trace, simulator_kwargs
from ferry.bench.sim import SimInstance, Simulator
from ferry.common.logging import configure
from ferry.services.scheduler.load import demand_blocks, dispatch_room
from ferry.services.scheduler.pending import PendingEntry, PendingQueue

WINDOW = 64  # held requests the release scans, in arrival order
BLOCK_TOKENS = 16  # bench.sim's engine


def start_room(inst: SimInstance) -> int:
    """Blocks a new request could take at once: free, less what the instance's own queue
    needs to start and the engine's admission watermark."""
    blocks = inst.engine.blocks
    queued = sum(blocks.blocks_for(r.num_tokens + 1) - len(r.block_ids)
                 for r in inst.engine.scheduler.waiting)
    watermark = int(blocks.num_total * inst.engine.scheduler.config.admission_watermark)
    return blocks.num_available - queued - watermark


class CentralQueue(Simulator):
    """The simulator with arrivals held centrally until an instance can start them (the
    scheduler's own PendingQueue for the order, with no max wait), placed by the policy
    among all open instances as the first version of the scheduler's pending queue did."""

    def __init__(self, *args, view: str = "true", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held = PendingQueue(capacity=len(self.trace) + 1, window=WINDOW,
                                 max_wait_s=math.inf)
        self.view = view  # "true": the engines' state; "reported": the scheduler's table

    def best_room(self) -> int:
        if self.view == "reported":
            return max(dispatch_room(load, headroom_blocks=0)
                       for load in self.core.table.loads().values())
        return max(start_room(i) for i in self.instances.values() if i.alive)

    def _on_report(self, payload) -> None:
        super()._on_report(payload)
        self._release()

    def _on_arrival(self, payload: tuple[int, dict]) -> None:
        index, entry = payload
        need = demand_blocks(int(entry["prompt_tokens"]) + 1, BLOCK_TOKENS)
        self.held.add(PendingEntry(f"r{index}", need, self.now, payload))
        self._release()

    def _on_step_done(self, payload) -> None:
        super()._on_step_done(payload)  # memory frees only when a step finishes
        self._release()

    def _release(self) -> None:
        while (entry := self.held.next_release(self.best_room(), self.now)) is not None:
            index, trace_entry = entry.payload
            super()._on_arrival(entry.payload)  # dispatch now, as the policy places it
            self.records[f"r{index}"].arrival_s = float(trace_entry["arrival_s"])


def run_one(trace: list[dict], policy: str, *, central: bool,
            args: argparse.Namespace) -> dict:
    common = simulator_kwargs(policy, args)
    sim = (CentralQueue(trace, view=args.view, **common) if central
           else Simulator(trace, **common))
    result = sim.run()
    return {"p99_prefill_s": result["prefill_latency_s"]["p99"],
            "p99_decode_s": result["decode_latency_s"]["p99"],
            "mean_e2e_s": result["e2e_latency_s"]["mean"],
            "preemptions": result["num_preemptions"], "migrations": result["num_migrations"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_arguments(parser, kind="L-L")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--view", choices=("true", "reported"), default="true",
                        help="the room a held request is released on (module docstring)")
    parser.add_argument("--central-only", action="store_true",
                        help="skip the runs without the central queue")
    args = parser.parse_args(argv)
    configure("sim", level="warning")
    report = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        trace = generated_trace(args, seed)
        for policy in args.policies.split(","):
            for central in (True,) if args.central_only else (False, True):
                row = {"kind": args.kind, "rate": args.rate, "seed": seed, "policy": policy,
                       "central_queue": args.view if central else False,
                       **run_one(trace, policy, central=central, args=args)}
                print(json.dumps(row), flush=True)
                report.append(row)


if __name__ == "__main__":
    main()
