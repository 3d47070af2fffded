"""What the simulator experiments beside paper_repro share (experiments.preemption_sites):
the cluster flags, a generated trace, and the simulator's setup
as paper_repro runs it (16 instances of the llama2-7b H200 profile, 1000 blocks each,
migration every 50 ms for llumnix, requests dispatched at once to per-instance queues)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from experiments.paper_repro import make_trace
from ferry.bench.sim import load_trace
from ferry.common.config import Endpoint, EngineConfig, SchedulerConfig
from ferry.services.worker.latency_model import Profile


def add_cluster_arguments(parser: argparse.ArgumentParser, *, kind: str) -> None:
    parser.add_argument("--kind", default=kind)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=1000)
    parser.add_argument("--profile", default="services/worker/profiles/llama2-7b-h200.json")
    parser.add_argument("--policies", default="least_load,llumnix")


def generated_trace(args: argparse.Namespace, seed: int) -> list[dict]:
    """A trace of args.kind at args.rate lasting args.duration_s (ferry bench trace)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.jsonl"
        make_trace(args.kind, args.rate, int(args.rate * args.duration_s), path,
                   max_total=4096, seed=seed)
        return load_trace(path)


def simulator_kwargs(policy: str, args: argparse.Namespace) -> dict:
    """Simulator(trace, **these) as paper_repro's policy runs set it up."""
    endpoint = Endpoint(bind="sim", advertise="sim")
    cfg = SchedulerConfig(inbox=endpoint, admin=endpoint, dispatch_policy=policy,
                          enable_migration=policy == "llumnix", migration_interval_s=0.05,
                          hold_until_room=False)  # per-instance queues, as measured
    return {"profile": Profile.load(args.profile), "num_instances": args.instances,
            "policy": policy, "kv_blocks": args.kv_blocks, "scheduler_config": cfg,
            "engine_config": EngineConfig(max_num_batched_tokens=4096)}
