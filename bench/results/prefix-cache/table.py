"""The table of bench/results/prefix-cache/README.md from the sims' JSON (run.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("tenants-350", "tenants --skew 1.2, 350 req/s"), ("tenants-450", "tenants, 450 req/s"),
        ("multiturn-1000", "multiturn --think-s 2, 1000 req/s"),
        ("multiturn-2000", "multiturn, 2000 req/s")]
RUNS = [("ferry", "ferry + pulls"), ("ferry-nopull", "ferry, no pulls"),
        ("prefix_affinity", "prefix_affinity")]


def main(out: Path) -> None:
    print("| trace | policy | TTFT P50 ms | TTFT P99 ms | mean e2e s | hit rate | pulls (ok) "
          "| pulled blocks | migrations | mig. blocks sent / skipped |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for trace, label in ROWS:
        for run, name in RUNS:
            path = out / f"{trace}-{run}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            ttft = r["prefill_latency_s"]
            print(f"| {label} | {name} | {ttft['p50'] * 1e3:.1f} | {ttft['p99'] * 1e3:.0f} "
                  f"| {r['e2e_latency_s']['mean']:.2f} | {r['cache_hit_rate']:.3f} "
                  f"| {r['num_pulls']} ({r['num_pulls_ok']}) | {r['num_pull_blocks']} "
                  f"| {r['num_migrations']} | {r['num_migration_blocks_sent']} / "
                  f"{r['num_migration_blocks_skipped']} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
