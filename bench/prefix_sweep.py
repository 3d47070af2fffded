"""The cache-heavy sweep of issue 12 in the simulator: every trace kind at several rates and
trace seeds, every policy on the same traces, and what a reader compares them by.

    ferry bench prefix-sweep --out-dir bench/results/prefix-sweep

For each (kind, rate, seed) one trace is generated (`ferry bench trace`) and every policy
variant simulates it (`ferry bench sim`, one process each, --jobs at a time). A run whose
JSON is already in --out-dir is not run again, so an interrupted sweep resumes where it
stopped. Then, per kind and rate:

- each policy's medians over seeds: TTFT P50/P99 and mean, P99 TPOT (a request's mean time
  per output token after the first), mean end-to-end latency, throughput, cache hit rate,
  prefix pulls and migrations;
- paired ratios against the reference variant (default `ferry`), seed by seed on the same
  trace: P99 TTFT(baseline) / P99 TTFT(reference), and the same for mean TTFT and mean
  e2e (> 1: the reference is better), as the median and range over seeds;
- per kind, the highest rate each variant sustains at a P99-TTFT SLO (1 s and 2 s): the
  median P99 interpolated linearly between the last rate that meets the SLO and the first
  that misses it ('>=' when the highest rate tried meets it, '<' when the lowest misses).

Writes runs/*.json (one per simulation), summary.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ferry.services.worker.latency_model import bundled_profile

PROFILE = bundled_profile("llama3-8b-h200")
SIM_BASE = ("--instances", "16", "--profile", str(PROFILE), "--migration-bandwidth-gbs", "200")
DEFAULT_KINDS = (
    "tenants:300,400,500:6000:--skew 1.2",
    "multiturn:1000,2000,3000:12000:--think-s 1",
    "longctx:20,30,40:1500:",
)
DEFAULT_VARIANTS = ("least_load", "prefix_affinity", "llumnix", "ferry")
SLOS_S = (1.0, 2.0)


@dataclass(frozen=True)
class KindSpec:
    """'kind:rate,rate,...:num[:trace flags]' of --kind."""

    kind: str
    rates: tuple[float, ...]
    num: int
    trace_flags: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> KindSpec:
        parts = text.split(":", 3)
        if len(parts) < 3:
            raise ValueError(f"--kind {text!r}: expected kind:rates:num[:trace flags]")
        kind, rates, num = parts[:3]
        return cls(kind, tuple(float(r) for r in rates.split(",")), int(num),
                   tuple(shlex.split(parts[3])) if len(parts) == 4 else ())


@dataclass(frozen=True)
class Variant:
    """'label=policy --sim-flag ...', or a bare policy; 'kind:label=...' for one kind only."""

    label: str
    policy: str
    flags: tuple[str, ...]
    only_kind: str | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        only_kind = None
        head, eq, spec = text.partition("=")
        if ":" in head:
            only_kind, head = head.split(":", 1)
        if not eq:
            return cls(head, head, (), only_kind)
        policy, *flags = shlex.split(spec)
        return cls(head, policy, tuple(flags), only_kind)


def run_name(kind: str, rate: float, seed: int, label: str) -> str:
    return f"{kind}-{rate:g}-s{seed}-{label}"


def make_trace(spec: KindSpec, rate: float, seed: int, path: Path, python: str) -> None:
    if path.exists():
        return
    tmp = path.with_suffix(".part")
    subprocess.run([python, "-m", "ferry.bench.trace", "--kind", spec.kind, "--rate", f"{rate:g}",
                    "--num", str(spec.num), "--seed", str(seed), *spec.trace_flags,
                    "--out", str(tmp)], check=True, capture_output=True, text=True)
    tmp.rename(path)


def simulate(trace: Path, variant: Variant, out: Path, extra: list[str], python: str) -> dict:
    if out.exists():
        return json.loads(out.read_text())
    tmp = out.with_suffix(".part")
    proc = subprocess.run([python, "-m", "ferry.bench.sim", "--trace", str(trace), *SIM_BASE,
                           *extra, "--policy", variant.policy, *variant.flags, "--out", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name}: ferry bench sim failed:\n{proc.stderr[-2000:]}")
    tmp.rename(out)
    return json.loads(out.read_text())


# ---- what is read off the runs (pure: tested on crafted results) ---------------------------


def run_metrics(result: dict) -> dict[str, float]:
    """One simulation's numbers for the table."""
    ttft, tpot, e2e = (result[k] for k in ("prefill_latency_s", "decode_latency_s",
                                           "e2e_latency_s"))
    span = result.get("sim_end_s") or float("nan")
    return {"ttft_p50_s": ttft["p50"], "ttft_p99_s": ttft["p99"], "ttft_mean_s": ttft["mean"],
            "tpot_p99_s": tpot["p99"], "e2e_mean_s": e2e["mean"],
            "throughput_rps": result["num_requests"] / span,
            "hit_rate": result.get("cache_hit_rate", float("nan")),
            "pulls": result.get("num_pulls", 0), "migrations": result["num_migrations"],
            "failed": result.get("num_failed", 0)}


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def paired_ratios(base: dict[int, dict[str, float]], ref: dict[int, dict[str, float]]) -> dict | None:
    """Seed-by-seed ratios base/ref on the seeds both ran (the same traces): > 1, ref is
    better. None when they share no seed."""
    seeds = sorted(base.keys() & ref.keys())
    if not seeds:
        return None
    out: dict = {"seeds": seeds}
    for key in ("ttft_p99_s", "ttft_mean_s", "e2e_mean_s"):
        ratios = [base[s][key] / ref[s][key] for s in seeds]
        out[key] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def slo_rate(points: list[tuple[float, float]], slo_s: float) -> str:
    """The highest rate meeting a P99-TTFT SLO from (rate, median P99) points, interpolated
    between the last rate that meets it and the next that misses it."""
    points = sorted(points)
    if points[0][1] > slo_s:
        return f"<{points[0][0]:g}"
    for (r0, p0), (r1, p1) in zip(points, points[1:], strict=False):
        if p0 <= slo_s < p1:
            return f"{r0 + (r1 - r0) * (slo_s - p0) / (p1 - p0):.0f}"
        if p1 > slo_s:  # not monotone: the first miss bounds it
            break
    last_ok = max(r for r, p in points if p <= slo_s)
    return f">={last_ok:g}" if last_ok == points[-1][0] else f"{last_ok:g}"


def summarize(results: dict[tuple[str, float, str], dict[int, dict]], reference: str) -> dict:
    """results[(kind, rate, label)][seed] = run_metrics of that run."""
    summary: dict = {"rows": [], "slo": {}}
    for (kind, rate, label), runs in sorted(results.items()):
        by_seed = [runs[s] for s in sorted(runs)]
        row = {"kind": kind, "rate": rate, "variant": label, "seeds": sorted(runs),
               **medians(by_seed), "ttft_p99_by_seed": [r["ttft_p99_s"] for r in by_seed]}
        ref = results.get((kind, rate, reference))
        if ref is not None and label != reference:
            vs = paired_ratios(runs, ref)
            if vs is not None:
                row["vs_reference"] = vs
        summary["rows"].append(row)
    for kind in sorted({k for k, _, _ in results}):
        for label in sorted({lab for k, _, lab in results if k == kind}):
            points = [(rate, row["ttft_p99_s"]) for row in summary["rows"]
                      if row["kind"] == kind and row["variant"] == label
                      for rate in [row["rate"]]]
            summary["slo"].setdefault(kind, {})[label] = {
                f"{slo:g}s": slo_rate(points, slo) for slo in SLOS_S}
    return summary


def table(summary: dict, reference: str) -> str:
    lines = [f"| trace | rate | variant | TTFT P50 ms | TTFT P99 ms | P99 TTFT ÷ {reference}'s "
             "(median [range]) | mean TTFT ÷ | mean e2e ÷ | P99 TPOT ms | mean e2e s "
             "| req/s | hit rate | pulls | migrations |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def ratio(row: dict, key: str) -> str:
        vs = row.get("vs_reference")
        if vs is None:
            return "—"
        r = vs[key]
        return f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"

    for row in summary["rows"]:

        lines.append(
            f"| {row['kind']} | {row['rate']:g} | {row['variant']} | {row['ttft_p50_s'] * 1e3:.0f} "
            f"| {row['ttft_p99_s'] * 1e3:.0f} | {ratio(row, 'ttft_p99_s')} | {ratio(row, 'ttft_mean_s')} "
            f"| {ratio(row, 'e2e_mean_s')} | {row['tpot_p99_s'] * 1e3:.1f} | {row['e2e_mean_s']:.2f} "
            f"| {row['throughput_rps']:.0f} | {row['hit_rate']:.3f} | {row['pulls']:.0f} "
            f"| {row['migrations']:.0f} |")
    lines += ["", "| trace | variant | " + " | ".join(f"rate at P99 TTFT ≤ {s:g} s" for s in SLOS_S)
              + " |", "|---|---|" + "---:|" * len(SLOS_S)]
    for kind, by_label in summary["slo"].items():
        for label, rates in by_label.items():
            lines.append(f"| {kind} | {label} | " + " | ".join(rates.values()) + " |")
    return "\n".join(lines) + "\n"


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry bench prefix-sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="bench/results/prefix-sweep")
    parser.add_argument("--kind", dest="kinds", action="append", default=[],
                        help="kind:rate,rate,...:num[:trace flags] (repeat; default: "
                             + "; ".join(DEFAULT_KINDS) + ")")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        help="label=policy --sim-flag ... ; [kind:]label=... for one kind only"
                             f" (repeat; default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--reference", default="ferry", help="the variant ratios are against")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--sim-args", default="", help="added to every simulation")
    parser.add_argument("--summarize-only", action="store_true",
                        help="no simulation: tabulate the runs already in --out-dir")
    args = parser.parse_args(argv)
    try:
        kinds = [KindSpec.parse(k) for k in args.kinds or DEFAULT_KINDS]
        variants = [Variant.parse(v) for v in args.variants or DEFAULT_VARIANTS]
    except ValueError as err:
        parser.error(str(err))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    traces = out / "traces"  # regenerated from the seed when missing; not kept in git
    traces.mkdir(exist_ok=True)
    python = sys.executable
    jobs = []
    for spec in kinds:
        for rate in spec.rates:
            for seed in seeds:
                trace = traces / f"{spec.kind}-{rate:g}-s{seed}.jsonl"
                for variant in variants:
                    if variant.only_kind not in (None, spec.kind):
                        continue
                    jobs.append((spec, rate, seed, trace, variant,
                                 out / "runs" / f"{run_name(spec.kind, rate, seed, variant.label)}.json"))

    def one(job):
        spec, rate, seed, trace, variant, path = job
        if args.summarize_only:
            return json.loads(path.read_text()) if path.exists() else None
        start = time.perf_counter()
        make_trace(spec, rate, seed, trace, python)
        try:
            result = simulate(trace, variant, path, shlex.split(args.sim_args), python)
        except RuntimeError as err:  # one failed run: said, left out, the sweep goes on
            print(err, file=sys.stderr, flush=True)
            return None
        print(f"{path.stem}: P99 TTFT {result['prefill_latency_s']['p99']:.3f} s "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return result

    # Traces first, one job each, so that two simulations never write the same trace.
    if not args.summarize_only:
        firsts = {job[3]: job for job in jobs}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda j: make_trace(j[0], j[1], j[2], j[3], python), firsts.values()))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, jobs))
    grouped: dict[tuple[str, float, str], dict[int, dict]] = {}
    for (spec, rate, seed, _trace, variant, _path), result in zip(jobs, results, strict=True):
        if result is not None:
            grouped.setdefault((spec.kind, rate, variant.label), {})[seed] = run_metrics(result)
    summary = summarize(grouped, args.reference)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = table(summary, args.reference)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
