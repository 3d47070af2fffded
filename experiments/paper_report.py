"""Write bench/results/paper-repro.md (tables) and plots from experiments.paper_repro's JSON."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ferry.bench.plots import policy_comparison


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


BASELINE = "least_load"
RATIO_SKIPS = (BASELINE, "round_robin")


def ratio_table(rows: list[dict], *, baseline: str = BASELINE) -> list[str]:
    """baseline ÷ each other policy but round_robin (llumnix and its variants), per trace
    and rate: P99 prefill as a ratio of the medians over seeds and as the median of the
    per-seed ratios (the paired comparison: both policies on the same trace), P99 decode
    and mean e2e as ratios of the medians."""
    b = baseline
    lines = [f"| trace | rate | policy | P99 prefill {b} ÷ policy (medians) | median of "
             f"per-seed ratios | seeds policy better / worse (>5%) | P99 decode {b} ÷ "
             f"policy | mean e2e {b} ÷ policy |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["kind"], r["rate"]), {})[r["policy"]] = r
    for (kind, rate), runs in by_key.items():
        ll = runs.get(baseline)
        if ll is None:
            continue
        for policy, lx in runs.items():
            if policy in (baseline, *RATIO_SKIPS):
                continue
            paired = paired_ratio(ll, lx)
            lines.append(
                f"| {kind} | {rate} | {policy} | "
                f"{ll['prefill_latency_s']['p99'] / lx['prefill_latency_s']['p99']:.2f}x | "
                f"{'-' if paired is None else f'{paired:.2f}x'} | {_seed_tally(ll, lx)} | "
                f"{ll['decode_latency_s']['p99'] / lx['decode_latency_s']['p99']:.2f}x | "
                f"{ll['e2e_latency_s']['mean'] / lx['e2e_latency_s']['mean']:.2f}x |")
    return lines


def _seed_pairs(ll: dict, lx: dict) -> list[tuple[float, float]]:
    """(least_load, policy) P99 prefill of each trace seed both ran."""
    return list(zip(ll.get("p99_prefill_by_seed", []), lx.get("p99_prefill_by_seed", []),
                    strict=True))


def paired_ratio(ll: dict, lx: dict) -> float | None:
    """Median over trace seeds of least_load's P99 prefill ÷ the policy's on the same seed
    (None without per-seed numbers). Near the knee the seeds' own loads differ more than
    the policies do, so a ratio of medians can compare one seed's overload with another's
    calm; the paired ratio cannot."""
    pairs = _seed_pairs(ll, lx)
    return statistics.median(a / b for a, b in pairs) if pairs else None


def _seed_tally(ll: dict, lx: dict) -> str:
    """'better / worse' over the trace seeds: the policy's P99 prefill more than 5% below or
    above least_load's on the same seed; '-' for results without per-seed numbers."""
    pairs = _seed_pairs(ll, lx)
    if not pairs:
        return "-"
    better = sum(a > 1.05 * b for a, b in pairs)
    worse = sum(b > 1.05 * a for a, b in pairs)
    return f"{better} / {worse} of {len(pairs)}"


def sustained_loads(rows: list[dict], *, slo_s: float) -> list[float]:
    """Per trace seed, the highest load fraction up to which every rate's P99 prefill is at
    most slo_s (0.0 if even the lowest misses it), from one trace kind and policy's rows.
    Only the seeds every rate ran count."""
    ordered = sorted(rows, key=lambda r: r["load_fraction"])
    num_seeds = min(len(r["p99_prefill_by_seed"]) for r in ordered)
    sustained = []
    for seed in range(num_seeds):
        best = 0.0
        for r in ordered:
            if r["p99_prefill_by_seed"][seed] > slo_s:
                break
            best = r["load_fraction"]
        sustained.append(best)
    return sustained


def slo_capacity_table(rows: list[dict], slos_s: tuple[float, ...]) -> list[str]:
    """Load each policy sustains at a P99 prefill SLO, seed by seed: how many fewer
    instances serve the same load, read off the measured rates (a coarse grid: a step is
    0.02-0.1 of the capacity estimate)."""
    lines = ["| trace | P99 prefill SLO s | least_load: load sustained per seed | llumnix | "
             "median llumnix ÷ least_load |", "| --- | ---: | --- | --- | ---: |"]
    for kind in sorted({r["kind"] for r in rows}):
        runs = {p: [r for r in rows if r["kind"] == kind and r["policy"] == p]
                for p in (BASELINE, "llumnix")}
        if not all(runs.values()):
            continue
        for slo in slos_s:
            ll, lx = (sustained_loads(runs[p], slo_s=slo) for p in (BASELINE, "llumnix"))
            gain = statistics.median(b / a if a else float("inf") for a, b in zip(ll, lx,
                                                                                 strict=True))
            lines.append(f"| {kind} | {slo:g} | {' / '.join(f'{x:.2f}' for x in ll)} | "
                         f"{' / '.join(f'{x:.2f}' for x in lx)} | {gain:.2f}x |")
    return lines


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


def central_queue_table(rows: list[dict]) -> list[str]:
    """P99 prefill per trace seed: each policy as it is, and with requests held in a
    central queue until an instance has room (bench/central_queue.py, since removed), by the engines'
    true state ("true") or the scheduler's load table ("reported")."""
    modes = (False, "true", "reported")
    columns = [(p, m) for p in (BASELINE, "llumnix") for m in modes]
    label = {False: "", "true": " + central (true)", "reported": " + central (reported)"}
    lines = ["| trace | rate | seed | " + " | ".join(f"{p}{label[m]}" for p, m in columns)
             + " |", "| --- | --- | ---: |" + " ---: |" * len(columns)]
    cells: dict[tuple, dict[tuple, float]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["rate"], r["seed"]), {})[
            (r["policy"], r["central_queue"])] = r["p99_prefill_s"]
    for (kind, rate, seed), runs in sorted(cells.items()):
        values = [f"{runs[c]:.2f}" if c in runs else "-" for c in columns]
        lines.append(f"| {kind} | {rate:g} | {seed} | " + " | ".join(values) + " |")
    return lines


SLOS_S = (0.5, 1.0, 2.0)
KNEE_TEXT = ("Every trace at 0.9-0.96 of its capacity estimate, least_load vs llumnix, trace "
             "seeds 0-2 (the same traces as seeds 0-2 above at 0.9): "
             "`bench/results/paper-repro/knee/run.sh` (log and JSON beside it).")
SLO_TEXT = ("Per trace seed (0-2), the highest measured load up to which every rate's P99 "
            "prefill is within the SLO (rates 0.7-0.85 from the policies run above, 0.9-0.96 "
            "from this one).")
VARIANTS_TEXT = ("llumnix with other migration settings, 4 trace seeds (0-3), each against "
                 "least_load on the same traces: `growth0`/`growth2` leave 0 or 2 blocks of "
                 "growth per running request at a destination (default 4), `mig4` allows 4 "
                 "concurrent migrations per instance (default 2), `shortest` moves the "
                 "shortest request (Llumnix's rule) instead of the one that relieves the "
                 "source; `thr0.5`/`thr2`/`thr4` make an instance a source below F = 0.5, 2 "
                 "or 4 (default 1; a destination needs F of at least the threshold plus "
                 "max(1, threshold)), from `run-thresholds.sh`. The rest from `run.sh`. "
                 "`mig4` is identical to llumnix: a round pairs each instance at most once "
                 "every 50 ms and a move takes milliseconds, so 2 concurrent never binds.")


HOLD_TEXT = ("The scheduler's pending queue (`hold_until_room`, DESIGN §2; on by default "
             "in `ferry up`, off in `bench.sim` unless `--hold-until-room`): `+hold` runs "
             "hold requests no instance has room for in the scheduler until a load report "
             "shows room. Every trace at 0.85-0.94 of capacity, 3 seeds, each policy against "
             "least_load dispatching at once (the INFaaS++-like baseline), then the two "
             "policies both holding: `bench/results/paper-repro/hold/run.sh` (the runs without "
             "holding) and `run-roomy.sh` (the `+hold` runs).")
CENTRAL_TEXT = ("P99 prefill s, seed by seed, at the rates where llumnix gained most past the "
                "knee (L-L 56 and M-M 137 req/s, 0.92 of capacity): "
                "`python -m ferry.bench.central_queue --kind L-L --rate 56 --seeds 0,1,2` (and "
                "`--view reported --central-only`) at commit 80a7756, before the experiment "
                "gave way to the scheduler's pending queue (`--hold-until-room`, measured "
                "above); JSON lines in `paper-repro/central-queue/`.")


def with_rates_of(extra: list[dict], rows: list[dict]) -> list[dict]:
    """extra's rows, plus rows' at the (trace, policy, load) extra has none of."""
    have = {(r["kind"], r["policy"], r["load_fraction"]) for r in extra}
    return extra + [r for r in rows if (r["kind"], r["policy"], r["load_fraction"]) not in have]


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
    knee = _load(base / "knee" / "knee.json")
    if knee:
        lines += ["## Past the knee", "", KNEE_TEXT, "", *ratio_table(knee), "",
                  "### Load sustained at a P99 prefill SLO", "", SLO_TEXT, "",
                  *slo_capacity_table(with_rates_of(knee, policies), SLOS_S), ""]
    variants = _load(base / "knee" / "variants.json")
    # The threshold run repeats least_load and llumnix on the same traces (same results).
    variants += [r for r in _load(base / "knee" / "thresholds.json")
                 if r["policy"] not in (BASELINE, "llumnix")]
    variants.sort(key=lambda r: (r["kind"], r["rate"]))
    if variants:
        lines += ["## Migration settings near the knee", "", VARIANTS_TEXT, "",
                  *ratio_table(variants), ""]
    # hold.json's +hold runs predate placing a held request only where it has room:
    # hold-roomy.json has them as the code is now (the runs without holding are the same).
    hold = [r for r in _load(base / "hold" / "hold.json") if not r["policy"].endswith("+hold")]
    hold += _load(base / "hold" / "hold-roomy.json")
    if hold:
        hold.sort(key=lambda r: (r["kind"], r["rate"]))
        both_hold = [r for r in hold if r["policy"].endswith("+hold")]
        lines += ["## The pending queue", "", HOLD_TEXT, "", *ratio_table(hold), "",
                  "Both policies with the pending queue:", "",
                  *ratio_table(both_hold, baseline="least_load+hold"), "",
                  *policy_table(hold), ""]
    prio_hold = _load(base / "hold" / "priorities-hold.json")
    scale_hold = _load(base / "hold" / "autoscale-hold.json")
    if prio_hold or scale_hold:
        lines += ["### Priorities and auto-scaling with the pending queue", "",
                  "The two experiments below, every simulation with `--hold-until-room`: "
                  "`bench/results/paper-repro/hold/run-prio-scale.sh`.", "",
                  *priority_table(prio_hold), "", *autoscale_ratio_table(scale_hold), ""]
    central = [json.loads(line) for path in sorted((base / "central-queue").glob("*.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    if central:
        lines += ["## Pooling the queues (simulator experiment)", "", CENTRAL_TEXT, "", *central_queue_table(central),
                  ""]
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
