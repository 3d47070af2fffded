"""Write bench/results/paper-repro.md (tables) and plots from bench.paper_repro's JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.plots import policy_comparison


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def policy_table(rows: list[dict]) -> list[str]:
    lines = ["| trace | rate req/s (load) | policy | P50 prefill s | P99 prefill s | P99 decode s "
             "| mean e2e s | preemptions | migrations |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['rate']} ({r['load_fraction']:.2f}) | {r['policy']} | "
            f"{r['prefill_latency_s']['p50']:.3f} | {r['prefill_latency_s']['p99']:.3f} | "
            f"{r['decode_latency_s']['p99']:.4f} | {r['e2e_latency_s']['mean']:.2f} | "
            f"{r['num_preemptions']:.0f} | {r['num_migrations']:.0f} |")
    return lines


def ratio_table(rows: list[dict]) -> list[str]:
    """least_load ÷ llumnix for P99 prefill and P99 decode at each trace's rates."""
    lines = ["| trace | rate | P99 prefill least_load ÷ llumnix | seeds llumnix better / "
             "worse (>5%) | P99 decode least_load ÷ llumnix | mean e2e least_load ÷ llumnix |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["kind"], r["rate"]), {})[r["policy"]] = r
    for (kind, rate), runs in by_key.items():
        if "least_load" not in runs or "llumnix" not in runs:
            continue
        ll, lx = runs["least_load"], runs["llumnix"]
        lines.append(
            f"| {kind} | {rate} | "
            f"{ll['prefill_latency_s']['p99'] / lx['prefill_latency_s']['p99']:.2f}x | "
            f"{_seed_tally(ll, lx)} | "
            f"{ll['decode_latency_s']['p99'] / lx['decode_latency_s']['p99']:.2f}x | "
            f"{ll['e2e_latency_s']['mean'] / lx['e2e_latency_s']['mean']:.2f}x |")
    return lines


def _seed_tally(ll: dict, lx: dict) -> str:
    """'better / worse' over the trace seeds: llumnix's P99 prefill more than 5% below or
    above least_load's on the same seed; '-' for results without per-seed numbers."""
    pairs = list(zip(ll.get("p99_prefill_by_seed", []), lx.get("p99_prefill_by_seed", []),
                     strict=True))
    if not pairs:
        return "-"
    better = sum(a > 1.05 * b for a, b in pairs)
    worse = sum(b > 1.05 * a for a, b in pairs)
    return f"{better} / {worse} of {len(pairs)}"


def _band(r: dict) -> str:
    return f"{r['band'][0]:g}..{r['band'][1]:g}"


def autoscale_table(rows: list[dict]) -> list[str]:
    lines = ["| trace | rate req/s (load) | band | policy | instance-seconds | mean instances | "
             "peak | scale-ups | drains | mean drain s | draining instance-s | P99 prefill s | "
             "migrations |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['rate']} ({r['load_fraction']:.2f}) | {_band(r)} | "
            f"{r['policy']} | {r['instance_seconds']:.0f} | {r['mean_instances']:.2f} | "
            f"{r['num_instances_max']} | {r['num_scale_ups']} | {r['num_drains']} | "
            f"{r['drain_s']['mean']:.1f} | {r['drain_instance_seconds']:.0f} | "
            f"{r['prefill_latency_s']['p99']:.3f} | {r['num_migrations']} |")
    return lines


def autoscale_ratio_table(rows: list[dict]) -> list[str]:
    """llumnix vs least_load under the same band, and (as the paper's Fig. 15 reads it) the
    cheapest llumnix band whose P99 prefill is no worse than least_load's under each band."""
    lines = ["| trace | least_load band | llumnix instance-s vs least_load, same band | P99 "
             "prefill least_load ÷ llumnix, same band | cheapest llumnix band with P99 <= "
             "least_load's | its instance-s vs least_load |",
             "| --- | --- | ---: | ---: | --- | ---: |"]
    by_trace: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_trace.setdefault(r["kind"], {}).setdefault(r["policy"], []).append(r)
    for kind, runs in by_trace.items():
        for ll in runs.get("least_load", []):
            same = next(r for r in runs.get("llumnix", []) if r["band"] == ll["band"])
            p99 = ll["prefill_latency_s"]["p99"]
            fit = [r for r in runs["llumnix"] if r["prefill_latency_s"]["p99"] <= p99]
            best = min(fit, key=lambda r: r["instance_seconds"]) if fit else None
            lines.append(
                f"| {kind} | {_band(ll)} | "
                f"{same['instance_seconds'] / ll['instance_seconds'] - 1:+.1%} | "
                f"{p99 / same['prefill_latency_s']['p99']:.2f}x | "
                f"{_band(best) if best else 'none'} | "
                + (f"{best['instance_seconds'] / ll['instance_seconds'] - 1:+.1%} |"
                   if best else "- |"))
    return lines


def _mean_e2e(row: dict, priority: str) -> float:
    return row["by_priority"][priority]["e2e_latency_s"]["mean"]


def priority_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(priorities, ignored) runs of the same trace, in trace order."""
    by_trace: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_trace.setdefault((r["cv"], r["seed"]), {})[r["mode"]] = r
    return [(runs["priorities"], runs["ignored"]) for _, runs in sorted(by_trace.items())
            if "priorities" in runs and "ignored" in runs]


def priority_table(rows: list[dict]) -> list[str]:
    """Mean e2e by class, priorities vs ignored, per trace, and the mean ratios per CV:
    high speedup = ignored ÷ priorities, normal change = priorities ÷ ignored - 1; bound =
    ignored ÷ the high-priority requests' e2e if each ran alone (no placement beats it)."""
    lines = ["| trace | seed | high e2e s: priorities | ignored | high speedup | bound | "
             "normal e2e s: priorities | ignored | normal change |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_cv: dict[float, list[tuple[dict, dict]]] = {}
    for on, off in priority_pairs(rows):
        by_cv.setdefault(on["cv"], []).append((on, off))
    for pairs in by_cv.values():
        speedups, changes = [], []
        for on, off in pairs:
            speedups.append(_mean_e2e(off, "high") / _mean_e2e(on, "high"))
            changes.append(_mean_e2e(on, "normal") / _mean_e2e(off, "normal") - 1)
            bound = _mean_e2e(off, "high") / on["high_isolated_e2e_s"]
            lines.append(f"| {on['kind']} | {on['seed']} | {_mean_e2e(on, 'high'):.3f} | "
                         f"{_mean_e2e(off, 'high'):.3f} | {speedups[-1]:.2f}x | {bound:.2f}x | "
                         f"{_mean_e2e(on, 'normal'):.3f} | {_mean_e2e(off, 'normal'):.3f} | "
                         f"{changes[-1]:+.1%} |")
        lines.append(f"| **{pairs[0][0]['kind']}, mean** | | | | "
                     f"**{sum(speedups) / len(speedups):.2f}x** | | | | "
                     f"**{sum(changes) / len(changes):+.1%}** |")
    return lines


def priority_detail(rows: list[dict]) -> list[str]:
    """Mean prefill and decode latency by class, and migrations, for every run."""
    lines = ["| trace | seed | run | high prefill ms | high decode ms | normal prefill ms | "
             "normal decode ms | migrations | preemptions |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for pair in priority_pairs(rows):
        for r in pair:
            b = r["by_priority"]
            lines.append(
                f"| {r['kind']} | {r['seed']} | {r['mode']} | "
                f"{b['high']['prefill_latency_s']['mean'] * 1e3:.1f} | "
                f"{b['high']['decode_latency_s']['mean'] * 1e3:.2f} | "
                f"{b['normal']['prefill_latency_s']['mean'] * 1e3:.1f} | "
                f"{b['normal']['decode_latency_s']['mean'] * 1e3:.2f} | "
                f"{r['num_migrations']} | {r['num_preemptions']} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="bench/results/paper-repro")
    parser.add_argument("--out", default="bench/results/paper-repro.md")
    parser.add_argument("--preamble", default="", help="markdown file placed before the tables")
    args = parser.parse_args(argv)
    base = Path(args.dir)
    policies = [row for path in sorted(base.glob("policies*.json")) for row in _load(path)]
    policies.sort(key=lambda r: (r["kind"], r["rate"], r["policy"]))
    plots = []
    for kind in sorted({r["kind"] for r in policies}):
        png = base / f"{kind}.png"
        policy_comparison([r for r in policies if r["kind"] == kind], png,
                          title=f"{kind}: 16 instances, llama2-7b H200 profile, 16k KV tokens each")
        plots.append(f"![{kind}](paper-repro/{png.name})")
    lines = [Path(args.preamble).read_text() if args.preamble else "", "## Policies", "",
             *ratio_table(policies), "", *plots, "", *policy_table(policies), ""]
    prio = _load(base / "priorities.json")
    if prio:
        lines += ["## Priorities", "", *priority_table(prio), "", *priority_detail(prio), ""]
    scale = _load(base / "autoscale.json")
    if scale:
        lines += ["## Auto-scaling", "", *autoscale_table(scale), "", *autoscale_ratio_table(scale),
                  ""]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
