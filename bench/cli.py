"""`ferry bench …`: trace, serve, sim, chaos (CPU); engine, migration, kernels, prefix-ttft
(GPU)."""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "trace": ("ferry.bench.trace", "make a seeded trace (JSONL)"),
    "serve": ("ferry.bench.serve", "replay a trace against a running cluster"),
    "sim": ("ferry.bench.sim", "discrete-event simulation of a cluster"),
    "prefix-sweep": ("ferry.bench.prefix_sweep",
                     "cache-heavy traces x rates x seeds x policies in the simulator"),
    "engine": ("ferry.bench.engine_bench", "engine step times vs roofline (GPU)"),
    "migration": ("ferry.bench.migration_bench", "live migration downtime and bandwidth (GPUs)"),
    "kernels": ("ferry.bench.kernels_bench", "attention kernels vs roofline (GPU)"),
    "prefix-ttft": ("ferry.bench.prefix_ttft", "TTFT with a cached prefix vs without (GPU)"),
    "chaos": ("ferry.bench.chaos", "faults under load: does every stream survive? (own cluster)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print("usage: ferry bench {" + ",".join(SUBCOMMANDS) + "} ...\n", file=sys.stderr)
        for name, (_, help_text) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_text}", file=sys.stderr)
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    module = __import__(SUBCOMMANDS[argv[0]][0], fromlist=["main"])
    module.main(argv[1:])
