"""Reproduce the Llumnix paper's comparisons with the simulator (bench/sim.py):

1. every trace kind at 3 request rates, round_robin vs least_load vs llumnix;
2. priorities: S-S, Gamma arrivals (CV 2, 4, 8; three seeds each), 10% high priority:
   llumnix with priority headroom vs the same cluster with priorities ignored;
3. auto-scaling: L-L under one scaling rule, least_load vs llumnix, instance-seconds.

Rates are set from each trace's capacity estimate (`capacity_rate`: prefill compute plus KV
tokens per instance over the token-steps a request holds, each step timed as a full
instance's), as fractions of it: high load that the cluster can still sustain is where
scheduling matters; past capacity every queue grows without bound. Traces last
--duration-s (120 s: several lifetimes of the longest requests), so what is measured is
the cluster's steady state, not its fill-up. Runs go `--jobs` at a time (each
simulation is one single-threaded process).

    python -m experiments.paper_repro --out-dir bench/results/paper-repro
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ferry.bench.sim import load_trace
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures

KINDS = ("S-S", "M-M", "L-L", "S-L", "L-S", "sharegpt", "burstgpt")
POLICIES = ("round_robin", "least_load", "llumnix")
LOAD_FRACTIONS = (0.7, 0.8, 0.85, 0.9)
PRIORITY_LOAD = 0.8  # S-S, of the capacity estimate
PROBE_REQUESTS = 20000  # requests in the trace a capacity estimate is taken from
BLOCK_TOKENS = 16  # tokens per KV block (bench.sim's engine)
PREFILL_CHUNK_TOKENS = 4096  # bench.sim's default --max-num-batched-tokens
# Auto-scaling: (fraction of the capacity estimate, Gamma CV) of each L-L trace, and the
# freeness bands (scale up below, scale down above) every trace runs with.
AUTOSCALE_LOADS = ((0.45, 4.0), (0.9, 2.0))
AUTOSCALE_BANDS = ((5, 30), (10, 60), (20, 120))
AUTOSCALE_REQUESTS = 6000  # minutes of load at these rates: many scale events, not one ramp


def sh(*args: str, stderr: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True,
                          text=True)
    return done.stderr if stderr else done.stdout


def make_trace(kind: str, rate: float, num: int, out: Path, *, max_total: int, seed: int = 0,
               cv: float = 1.0, high_frac: float = 0.0) -> dict:
    stats = sh("ferry.bench.trace", "--kind", kind, "--rate", f"{rate:.3f}", "--num", str(num),
               "--seed", str(seed), "--cv", str(cv), "--high-frac", str(high_frac),
               "--max-total-tokens", str(max_total), "--out", str(out), stderr=True)
    return json.loads(stats.strip().splitlines()[-1])


def capacity_rate(trace: list[dict], *, instances: int, kv_tokens: int,
                  latency: LatencyModel) -> float:
    """Requests/s a cluster of full instances sustains: each request costs its prefill's
    compute plus its share of the decode steps it takes part in,

        rate = instances / (mean prefill s + mean(o) * step_s / concurrency),

    step_s timed as a full instance's step. A request with prompt p and output o holds
    p + j tokens during its j-th decode step, so it occupies o * p + o * (o + 1) / 2
    token-steps of memory, and a full instance runs the time-average number of requests
    that fill it, concurrency = kv_tokens * mean(o) / mean(token-steps). With heavy-tailed
    lengths that mean is far above mean(p + o / 2) * mean(o): the long requests hold the
    most tokens for the most steps (on the power-law traces the product of means
    over-states capacity 1.6-3x). Prefill is what bounds long prompts with short outputs
    (L-S, BurstGPT): there the decode share is small."""
    token_steps = statistics.fmean(
        r["output_tokens"] * r["prompt_tokens"] + r["output_tokens"] * (r["output_tokens"] + 1) / 2
        for r in trace)
    steps = statistics.fmean(r["output_tokens"] for r in trace)
    concurrency = kv_tokens * steps / token_steps
    step_s = latency.step_time(StepFeatures(P=0, A=0, D=round(concurrency), C=kv_tokens))
    prefill_s = statistics.fmean(
        latency.step_time(StepFeatures(P=r["prompt_tokens"], A=r["prompt_tokens"] ** 2, D=0,
                                       C=0)) - latency.base_s
        for r in trace)
    return instances / (prefill_s + steps * step_s / concurrency)


def trace_capacity(kind: str, args: argparse.Namespace, tmp: Path) -> float:
    """capacity_rate of a kind's length mix, from a large probe trace (the token-steps'
    mean is set by the rare long requests, so it needs many samples)."""
    probe = tmp / f"probe-{kind}.jsonl"
    make_trace(kind, 1.0, PROBE_REQUESTS, probe, max_total=args.max_total)
    return capacity_rate(load_trace(probe), instances=args.instances,
                         kv_tokens=args.kv_blocks * BLOCK_TOKENS,
                         latency=Profile.load(args.profile).latency)


def requests_for(rate: float, args: argparse.Namespace) -> int:
    """Requests in a trace of --duration-s at rate, within --min/--max-requests."""
    return int(min(args.max_requests, max(args.min_requests, rate * args.duration_s)))


def isolated_e2e_s(trace: list[dict], latency: LatencyModel, *, priority: str,
                   chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> float:
    """Mean e2e of the trace's `priority` requests if each ran alone on an idle instance:
    its prompt in chunks of chunk_tokens (the first output token comes with the last
    chunk), then one decode step of a batch of one per further token. No placement can
    do better, so ignored ÷ this bounds the speedup of priorities."""
    total = 0.0
    reqs = [r for r in trace if r["priority"] == priority]
    for req in reqs:
        prompt, output = req["prompt_tokens"], req["output_tokens"]
        for start in range(0, prompt, chunk_tokens):
            end = min(prompt, start + chunk_tokens)
            total += latency.step_time(StepFeatures(P=end - start, A=(end - start) * end,
                                                    D=0, C=0))
        # The step that makes output token j (j >= 1) feeds token j - 1 at position
        # prompt + j - 1: a cache of prompt + j tokens.
        total += sum(latency.step_time(StepFeatures(P=0, A=0, D=1, C=prompt + j))
                     for j in range(1, output))
    return total / len(reqs)


def simulate(trace: Path, policy: str, args: argparse.Namespace, *extra: str) -> dict:
    out = sh("ferry.bench.sim", "--trace", str(trace), "--instances", str(args.instances),
             "--policy", policy, "--profile", args.profile, "--kv-blocks", str(args.kv_blocks),
             "--migration-interval-s", "0.05", *shlex.split(args.sim_args), *extra)
    return json.loads(out)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """'label=policy --flag value ...' (or just 'policy') -> (label, policy, flags)."""
    label, _, spec = text.partition("=") if "=" in text else (text, "", text)
    policy, *flags = shlex.split(spec)
    return label, policy, flags


def median_leaves(results: list[dict]) -> dict:
    """Results of one configuration over several trace seeds -> one result: the median of
    every number (nested dicts alike); other values from the first."""
    first = results[0]
    merged = {}
    for key, value in first.items():
        values = [r.get(key) for r in results]
        if isinstance(value, dict):
            merged[key] = median_leaves(values)
        elif isinstance(value, int | float) and not isinstance(value, bool) and all(
                isinstance(v, int | float) for v in values):
            merged[key] = statistics.median(values)
        else:
            merged[key] = value
    return merged


def run_jobs(jobs: list[tuple[dict, Path, str, list[str]]], args: argparse.Namespace,
             rows: list) -> None:
    """Simulate every (row fields, trace, policy, flags), args.jobs at a time; rows are
    appended in job order, one per row fields: the median over the jobs sharing them (one
    per trace seed, `seeds` in the row)."""
    def one(job):
        fields, trace, policy, flags = job
        start = time.perf_counter()
        result = simulate(trace, policy, args, *flags)
        print(f"{fields['kind']:>8} {fields['rate']:>7} {fields['policy']:>11} {trace.stem}: "
              f"p99 prefill "
              f"{result['prefill_latency_s']['p99']:.3f} s, preemptions "
              f"{result['num_preemptions']}, migrations {result['num_migrations']} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        return {**fields, **result}  # one seed's

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, jobs))
    grouped: dict[str, list[dict]] = {}
    for (fields, *_), result in zip(jobs, results, strict=True):
        grouped.setdefault(json.dumps(fields, sort_keys=True), []).append(result)
    for group in grouped.values():
        # Near the knee one seed's P99 can be 100x another's: keep each seed's beside the
        # median (in seed order), so a comparison can be read seed by seed.
        rows.append({**median_leaves(group), "seeds": len(group),
                     "p99_prefill_by_seed": [r["prefill_latency_s"]["p99"] for r in group]})


def run_policies(args: argparse.Namespace, tmp: Path, rows: list) -> None:
    variants = [parse_variant(v) for v in args.variants] or [(p, p, []) for p in POLICIES]
    jobs = []
    for kind in args.kinds.split(","):
        cap = trace_capacity(kind, args, tmp)
        for frac in [float(x) for x in args.load_fractions.split(",")]:
            rate = round(cap * frac, 1)
            num = requests_for(rate, args)
            for seed in range(args.seeds):
                trace = tmp / f"{kind}-{rate}-s{seed}.jsonl"
                make_trace(kind, rate, num, trace, max_total=args.max_total, seed=seed)
                for label, policy, flags in variants:
                    fields = {"experiment": "policies", "kind": kind, "rate": rate,
                              "load_fraction": frac, "num": num, "policy": label}
                    jobs.append((fields, trace, policy, flags))
    run_jobs(jobs, args, rows)


def run_priorities(args: argparse.Namespace, tmp: Path, rows: list) -> None:
    """S-S at --priority-load of capacity, 10% high priority, Gamma arrivals at each CV
    and seed: llumnix with the headroom (priority-aware placement) vs the same with every
    request scheduled as normal. Seeds change lengths, arrivals and priorities together.
    One row per (CV, seed, mode)."""
    rate = round(trace_capacity("S-S", args, tmp) * args.priority_load, 1)
    num = requests_for(rate, args)
    runs = (("priorities", ["--headroom-blocks", str(args.headroom)]),
            ("ignored", ["--ignore-priority"]))
    latency = Profile.load(args.profile).latency
    jobs = []
    for cv in [float(x) for x in args.priority_cvs.split(",")]:
        for seed in [int(x) for x in args.priority_seeds.split(",")]:
            trace = tmp / f"prio-cv{cv:g}-s{seed}.jsonl"
            make_trace("S-S", rate, num, trace, max_total=args.max_total, seed=seed, cv=cv,
                       high_frac=0.1)
            bound = isolated_e2e_s(load_trace(trace), latency, priority="high")
            for mode, flags in runs:
                fields = {"experiment": "priorities", "kind": f"S-S cv{cv:g} 10% high",
                          "cv": cv, "seed": seed, "rate": rate,
                          "load_fraction": args.priority_load, "num": num,
                          "policy": "llumnix", "mode": mode,
                          "headroom_blocks": args.headroom, "high_isolated_e2e_s": bound}
                jobs.append((fields, trace, "llumnix", flags))
    run_jobs(jobs, args, rows)


def run_autoscale(args: argparse.Namespace, tmp: Path, rows: list) -> None:
    """Each load with each band, least_load vs llumnix under the same rule: starting from
    --instances (the most), at least 2, one action per 5 s cooldown, 5 s to start one."""
    cap = trace_capacity("L-L", args, tmp)
    jobs = []
    for frac, cv in AUTOSCALE_LOADS:
        rate = round(cap * frac, 1)
        for seed in range(args.seeds):
            trace = tmp / f"autoscale-{frac}-cv{cv:g}-s{seed}.jsonl"
            make_trace("L-L", rate, AUTOSCALE_REQUESTS, trace, max_total=args.max_total, cv=cv,
                       seed=seed)
            for up, down in AUTOSCALE_BANDS:
                for policy in ("least_load", "llumnix"):
                    fields = {"experiment": "autoscale", "kind": f"L-L cv{cv:g}", "rate": rate,
                              "load_fraction": frac, "num": AUTOSCALE_REQUESTS,
                              "band": [up, down], "policy": policy}
                    flags = ["--autoscale", "--min-workers", "2", "--max-workers",
                             str(args.instances), "--scale-up-freeness", str(up),
                             "--scale-down-freeness", str(down), "--scale-cooldown-s", "5",
                             "--startup-s", "5"]
                    jobs.append((fields, trace, policy, flags))
    run_jobs(jobs, args, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="bench/results/paper-repro")
    parser.add_argument("--profile", default="services/worker/profiles/llama2-7b-h200.json")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=1000, help="16k tokens each")
    parser.add_argument("--max-total", type=int, default=4096, help="llama2-7b's context")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--load-fractions", default=",".join(map(str, LOAD_FRACTIONS)),
                        help="request rates as fractions of the capacity estimate")
    parser.add_argument("--duration-s", type=float, default=120.0,
                        help="trace length: several lifetimes of the longest requests "
                        "(~25 s), so the cluster reaches its steady state")
    parser.add_argument("--min-requests", type=int, default=2000)
    parser.add_argument("--max-requests", type=int, default=40000)
    parser.add_argument("--headroom", type=int, default=16,
                        help="virtual blocks per high-priority request (priorities)")
    parser.add_argument("--priority-load", type=float, default=PRIORITY_LOAD,
                        help="S-S rate as a fraction of the capacity estimate (priorities)")
    parser.add_argument("--priority-cvs", default="2,4,8",
                        help="Gamma CVs of the arrivals (priorities)")
    parser.add_argument("--priority-seeds", default="0,1,2", help="trace seeds (priorities)")
    parser.add_argument("--experiments", default="policies,priorities,autoscale")
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--seeds", type=int, default=1,
                        help="traces per rate (seeds 0..N-1); results are medians over them")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="simulations run at once")
    parser.add_argument("--sim-args", default="",
                        help="flags added to every simulation, e.g. '--hold-until-room'")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        help="policies experiment: 'label=policy --sim-flag value ...' "
                             "(repeatable; default: the three policies as they are)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    tmp = out_dir / "traces"
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    experiments = args.experiments.split(",")
    for name, fn in (("policies", run_policies), ("priorities", run_priorities),
                     ("autoscale", run_autoscale)):
        if name in experiments:
            fn(args, tmp, rows)
            (out_dir / f"{name}{args.suffix}.json").write_text(json.dumps(
                [r for r in rows if r["experiment"] == name], indent=1) + "\n")
    print(json.dumps({"runs": len(rows), "median_wall_s":
                      statistics.median(r["wall_s"] for r in rows) if rows else 0}))


if __name__ == "__main__":
    main()
