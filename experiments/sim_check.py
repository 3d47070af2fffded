"""`python -m experiments.sim_check`: the simulator checked against a real worker.

One real worker (`--model`, e.g. random:llama2-7b, on `--device cuda`) behind the real
gateway and scheduler (`ferry up --workers 1`) replays seeded traces with the load
driver (`ferry bench serve`), logging every engine step it runs (`--step-log`). Then:

- the latency model is refitted to those in-situ steps (every step the trace made:
  prefill chunks, decode batches and mixed ones, at the contexts that really occurred),
  once to the model's step time alone (what `ferry profile` measures) and once to the
  whole engine cycle (the step, the engine's scheduling and bookkeeping around it, and
  the event loop's gap before the next step starts, which the simulator does not model
  otherwise);
- the same traces run through the discrete-event simulator (`ferry bench sim
  --instances 1`) with the bundled profile (`--profile`) and with the refitted one, at the
  same KV size and step token budget;
- side by side: P50/P99 TTFT (prefill latency), P99 decode, mean e2e, preemptions,
  throughput, and each model's per-step error against the measured steps (median and
  p90 of |predicted - measured| / measured, by step kind). The refit is evaluated on the
  steps it was fitted to (in-sample) and, per trace, fitted on the other traces only;
- the cycle model again with the steps' measured spread (`--spread-seeds` seeds) and, where
  the load driver kept each request's times, with the request path's costs fitted in situ
  (`fit_request_path`: the way out from the step log's clock against the client's, the
  way in from the least loaded replays). The simulator serves the same distinct prompts
  with the prefix cache on, as the worker does.

Writes sim_check.json, the step log and the refitted profile under --out-dir and prints
the tables. Plan a GPU call around `--num` and `--load-fractions`: each replay lasts about
num / rate seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from experiments import request_compare
from experiments.paper_repro import capacity_rate
from ferry.bench import serve, sim
from ferry.bench import trace as traces
from ferry.bench.local_cluster import start_cluster
from ferry.bench.sim import RequestPath
from ferry.services.worker import step_log
from ferry.services.worker.latency_model import LatencyModel, Profile, bundled_profile
from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.model.resolve import resolve_model
from ferry.services.worker.step_log import add_gaps, cycle_s, features

TOKENS_PER_BLOCK = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", default=str(bundled_profile("llama2-7b-h200")),
                        help="the bundled profile the simulator uses (and the rates' base)")
    parser.add_argument("--kv-blocks", type=int, default=1000,
                        help="KV blocks of the worker and the simulated instance")
    parser.add_argument("--kinds", default="M-M,L-L", help="trace kinds (ferry bench trace)")
    parser.add_argument("--load-fractions", default="0.5,0.8,1.1",
                        help="rates as fractions of the bundled profile's capacity estimate")
    parser.add_argument("--rates", default="",
                        help="rates in req/s instead of --load-fractions (for a card the "
                             "bundled profile misjudges; each row still reports its fraction "
                             "of the bundled estimate); KIND:RATE applies to that kind only")
    parser.add_argument("--warm-up", type=int, default=0,
                        help="first replay this many requests of each trace kind, unmeasured "
                             "(their steps are left out): the worker is then warm, as one "
                             "that has served a while")
    parser.add_argument("--num", type=int, default=200, help="requests per trace")
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--tenants", type=int, default=traces.CacheShape().tenants,
                        help="shared prefixes (system prompts, documents) of the cache-heavy "
                             "kinds")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="bench/results/sim-check",
                        help="sim_check.json, steps.jsonl, profile-insitu.json")
    parser.add_argument("--serve-dir", default="",
                        help="each replay's serve JSON (with each request's times) and plot, "
                             "and the cycle model's simulated request times (default: not "
                             "kept)")
    parser.add_argument("--replayed", default="",
                        help="no GPU: re-analyse a finished run's directory (its sim_check.json "
                             "and steps.jsonl; the traces are regenerated from their seeds) "
                             "with this version of the latency model and simulator")
    parser.add_argument("--spread-seeds", type=int, default=5,
                        help="also simulate the cycle model with the measured step-time "
                             "spread, drawn from this many seeds (0: not)")
    parser.add_argument("--request-in-ms", type=float, default=None,
                        help="the request path's IN (ms) as measured elsewhere, instead of "
                             "fitted from each kind's least loaded replay: for a run whose "
                             "replays all queue, where that fit would count queueing as IN "
                             "(OUT is measured in situ either way)")
    parser.add_argument("--sensitivity", default="0.95,1.05",
                        help="also simulate with the in-situ step times scaled by these "
                             "factors: how far P99 moves for a small model error")


@dataclasses.dataclass
class Replay:
    kind: str
    fraction: float
    rate: float
    trace: Path
    real: dict  # summary() of the load driver's result, plus num_steps
    steps: list[dict]  # the worker's step log lines written during this replay
    # the load driver's own times of each request ("requests", "start_unix" of its JSON);
    # None for runs made before it kept them
    requests: dict | None = None


def rates_of(spec: str, kind: str) -> list[float]:
    """The --rates that apply to kind: 'RATE' applies to every kind, 'KIND:RATE' to
    KIND only."""
    out = []
    for entry in spec.split(","):
        only, _, rate = entry.rpartition(":")
        try:
            value = float(rate)
        except ValueError:
            raise SystemExit(f"--rates: {entry!r} is not RATE or KIND:RATE") from None
        if only in ("", kind):
            out.append(value)
    return out


def make_traces(args: argparse.Namespace, latency: LatencyModel, tmp: Path) -> list[tuple]:
    out = []
    shape = traces.CacheShape(tenants=args.tenants)
    for kind in args.kinds.split(","):
        probe = traces.generate(kind, num=20_000, rate=1.0, seed=args.seed + 1,
                                max_total_tokens=args.max_total_tokens, shape=shape)
        capacity = capacity_rate([dataclasses.asdict(r) for r in probe], instances=1,
                                 kv_tokens=args.kv_blocks * TOKENS_PER_BLOCK, latency=latency)
        rates = (rates_of(args.rates, kind) if args.rates else
                 [float(f) * capacity for f in args.load_fractions.split(",")])
        for rate in rates:
            fraction = round(rate / capacity, 4)
            path = tmp / f"{kind}-{fraction}.jsonl"
            with path.open("w") as f:
                traces.write_jsonl(traces.generate(kind, num=args.num, rate=rate,
                                                   seed=args.seed,
                                                   max_total_tokens=args.max_total_tokens,
                                                   shape=shape), f)
            out.append((kind, fraction, rate, path))
    return out


def replay_all(args: argparse.Namespace, planned: list[tuple], tmp: Path) -> list[Replay]:
    log_path = Path(args.out_dir) / "steps.jsonl"
    log_path.unlink(missing_ok=True)
    cluster = start_cluster(tmp / "up", workers=1, timeout_s=600, extra=(
        "--model", args.model, "--device", args.device, "--num-blocks", str(args.kv_blocks),
        "--policy", "least_load", f"--worker-arg=--step-log={log_path.resolve()}",
        f"--worker-arg=--max-num-batched-tokens={args.max_num_batched_tokens}",
        "--gateway-arg=--max-inflight=8192", "--gateway-arg=--max-tokens-limit=32768"))
    replays = []
    vocab_size = ModelConfig.from_dir(resolve_model(args.model)).vocab_size
    if args.serve_dir:
        Path(args.serve_dir).mkdir(parents=True, exist_ok=True)
    try:
        warm_up(args, planned, cluster, vocab_size, tmp)
        args.warm_up_steps = len(log_path.read_text().splitlines()) if log_path.exists() else 0
        for index, (kind, fraction, rate, path) in enumerate(planned):
            done = len(log_path.read_text().splitlines()) if log_path.exists() else 0
            serve_args = argparse.Namespace(
                trace=str(path), sdk_addr=cluster.sdk_addr, http="",
                admin_addr=cluster.admin_addr, vocab_size=vocab_size, time_scale=1.0,
                # Prompts of their own: the worker's prefix cache keeps an earlier
                # replay's prompts (all of them, with a card's real KV), which would hit
                # where the simulator, starting empty, computes.
                max_output_tokens=0, max_prompt_tokens=0, timeout=600.0,
                seed=args.seed + 1 + index,
                out=str(Path(args.serve_dir or tmp) / f"serve-{kind}-{fraction}.json"),
                label=f"{kind}@{fraction}", no_progress=True)
            real = serve.run(serve_args)
            cluster.wait_idle(timeout_s=60)
            time.sleep(0.5)  # the worker's last step line reaches the file
            lines = log_path.read_text().splitlines()[done:]
            steps = [json.loads(line) for line in lines if line.strip()]
            add_gaps(steps)
            replays.append(Replay(kind, fraction, rate, path,
                                  summary(real) | {"num_steps": len(steps)}, steps,
                                  {"requests": real["requests"],
                                   "start_unix": real["start_unix"]}))
            print(f"replayed {kind} at {rate:.2f} req/s: {len(lines)} steps, p99 ttft "
                  f"{real['prefill_latency_s']['p99']:.3f} s", flush=True)
    finally:
        cluster.stop()
    return replays


def warm_up(args: argparse.Namespace, planned: list[tuple], cluster, vocab_size: int,
            tmp: Path) -> None:
    """Replay the first --warm-up requests of each kind's first trace, unmeasured."""
    if args.warm_up <= 0:
        return
    firsts = {}
    for kind, _, _, path in planned:
        firsts.setdefault(kind, path)
    for kind, path in firsts.items():
        head = tmp / f"warm-up-{kind}.jsonl"
        head.write_text("".join(path.read_text().splitlines(keepends=True)[:args.warm_up]))
        serve.run(argparse.Namespace(
            trace=str(head), sdk_addr=cluster.sdk_addr, http="",
            admin_addr=cluster.admin_addr, vocab_size=vocab_size, time_scale=1.0,
            max_output_tokens=0, max_prompt_tokens=0, timeout=600.0, seed=args.seed + 1000,
            out=str(tmp / f"warm-up-{kind}.json"), label=f"{kind} warm-up",
            no_progress=True))
        cluster.wait_idle(timeout_s=60)
        print(f"warm-up: {args.warm_up} requests of {kind}", flush=True)
    time.sleep(0.5)  # the warm-up's last step line reaches the file first


def refit(samples: list[dict], *, whole_cycle: bool = False) -> LatencyModel:
    return step_log.fit(samples, whole_cycle=whole_cycle)


def step_errors(latency: LatencyModel, samples: list[dict], *, whole_cycle: bool = False
                ) -> dict:
    """Relative error of the model per step kind (against the step time, or the whole
    cycle): median and p90."""
    by_kind: dict[str, list[float]] = {"prefill": [], "decode": [], "mixed": [], "all": []}
    for s in samples:
        measured = cycle_s(s) if whole_cycle else s["step_s"]
        err = abs(latency.step_time(features(s)) - measured) / measured
        kind = "mixed" if s["P"] and s["D"] else "prefill" if s["P"] else "decode"
        by_kind[kind].append(err)
        by_kind["all"].append(err)
    return {k: {"n": len(v), "median": statistics.median(v) if v else None,
                # nearest rank: of 2 errors, the larger
                "p90": sorted(v)[math.ceil(0.9 * len(v)) - 1] if v else None}
            for k, v in by_kind.items()}


def scale_latency(latency: LatencyModel, factor: float) -> LatencyModel:
    """Every step `factor` times as long (the spread, a ratio, unchanged)."""
    return dataclasses.replace(latency, **{k: getattr(latency, k) * factor
                                           for k in LatencyModel.COEFFICIENTS})


def simulate(args: argparse.Namespace, trace: Path, profile: Path,
             spread_seed: int | None = None, requests_out: Path | None = None,
             path: RequestPath | None = None) -> dict:
    """One simulated replay; deterministic steps unless spread_seed is given (then the
    profile's measured step spread, drawn from that seed). requests_out: where to keep each
    request's simulated times (as the load driver keeps the real ones); path: the request
    path's costs around the engine (none: zero)."""
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    spread = (["--no-step-spread"] if spread_seed is None
              else ["--step-spread-seed", str(spread_seed)])
    if requests_out is not None:
        spread += ["--requests-out", str(requests_out)]
    if path is not None:
        spread += ["--request-path-ms", f"{path.in_s * 1e3:.4f},{path.out_s * 1e3:.4f}"]
    return sim.run(parser.parse_args([
        "--trace", str(trace), "--instances", "1", "--policy", "least_load",
        "--profile", str(profile), "--kv-blocks", str(args.kv_blocks),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        # the real scheduler's default (SchedulerConfig.hold_until_room), which the real
        # cluster runs with: requests without room wait in its pending queue
        "--hold-until-room",
        # distinct prompts and the prefix cache on, as the real worker has them: a
        # preempted request's recompute finds its own blocks still cached
        "--distinct-prompts", *spread]))


def spread_runs(args: argparse.Namespace, trace: Path, profile: Path,
                path: RequestPath | None = None) -> dict:
    """The cycle model with its measured step spread, over --spread-seeds seeds: each
    metric's median over the seeds, and P99 TTFT's range."""
    runs = [summary(simulate(args, trace, profile, spread_seed=seed, path=path))
            for seed in range(args.spread_seeds)]
    out = {key: statistics.median(r[key] for r in runs) if all(
        r[key] is not None for r in runs) else None for key in runs[0]}
    p99s = sorted(r["ttft_p99"] for r in runs)
    out |= {"ttft_p99_min": p99s[0], "ttft_p99_max": p99s[-1], "seeds": len(runs)}
    return out


def fit_request_path(args: argparse.Namespace, replays: list[Replay], cycle_path: Path,
                     tmp: Path) -> RequestPath | None:
    """The request path's costs, in situ (None: no replay kept its request times).

    out_s: the median over requests of the client's first token - the end of the step
    that made it (the step log's clock is the load driver's). in_s: the median over the
    requests of each kind's least loaded replay of real TTFT - simulated TTFT, the
    simulation run with out_s and no in_s (the deterministic cycle model): what a lone
    request pays beyond the steps and the way out; or --request-in-ms where given."""
    kept = [r for r in replays if r.requests is not None]
    if not kept:
        return None
    outs = []
    for r in kept:
        ends = sorted(s["t"] for s in r.steps)
        outs += request_compare.way_out(request_compare.by_index(r.requests["requests"]),
                                        r.requests["start_unix"], ends)
    out_s = statistics.median(outs) if outs else 0.0
    if args.request_in_ms is not None:
        return RequestPath(in_s=args.request_in_ms / 1e3, out_s=out_s)
    least = {}
    for r in sorted(kept, key=lambda r: r.rate, reverse=True):
        least[r.kind] = r  # the lowest rate of each kind last: it stays
    offsets = []
    for r in least.values():
        rows = tmp / f"path-fit-{r.kind}.json"
        simulate(args, r.trace, cycle_path, requests_out=rows, path=RequestPath(0.0, out_s))
        offsets += request_compare.ttft_offsets(r.requests["requests"],
                                                json.loads(rows.read_text()))
    in_s = max(0.0, statistics.median(offsets)) if offsets else 0.0
    return RequestPath(in_s=in_s, out_s=out_s)


def summary(result: dict) -> dict:
    duration = result.get("duration_s") or result.get("sim_end_s") or 0.0  # real / simulated
    return {"ttft_p50": result["prefill_latency_s"]["p50"],
            "ttft_p99": result["prefill_latency_s"]["p99"],
            "decode_p99": result["decode_latency_s"]["p99"],
            "e2e_mean": result["e2e_latency_s"]["mean"],
            "preemptions": result["num_preemptions"],
            "req_per_s": result["num_requests"] / duration if duration else None,
            # prompt tokens found in the prefix cache (the load driver's from the
            # responses' usage; the simulator's own); None where the run had no cache
            "cache_hit_rate": result.get("cache_hit_rate")}


def load_replays(args: argparse.Namespace, planned: list[tuple]) -> list[Replay]:
    """A finished run's replays from its directory (`--replayed`): the real results from
    sim_check.json, each replay's steps cut from steps.jsonl by its step count."""
    run_dir = Path(args.replayed)
    previous = json.loads((run_dir / "sim_check.json").read_text())
    plain = run_dir / "steps.jsonl"
    samples = step_log.read(plain if plain.exists() else run_dir / "steps.jsonl.gz")
    rows = previous["rows"]
    if [(r["kind"], r["fraction"]) for r in rows] != [(k, f) for k, f, _, _ in planned]:
        raise SystemExit(f"{run_dir}: its traces differ from --kinds and --load-fractions "
                         f"(or --rates)")
    for key in ("max_total_tokens", "seed", "tenants"):  # kept by runs since session 10
        if key in previous and previous[key] != getattr(args, key):
            raise SystemExit(f"{run_dir}: it ran with --{key.replace('_', '-')} "
                             f"{previous[key]}, not {getattr(args, key)}")
    # The log starts with the unmeasured warm-up's steps (--warm-up), then each replay's.
    kept = request_compare.load_runs(run_dir)  # each replay's request times, if kept
    replays, done = [], previous.get("warm_up_steps", 0)
    if done + sum(row["real"]["num_steps"] for row in rows) > len(samples):
        raise SystemExit(f"{run_dir}: the step log has {len(samples)} steps, fewer than its "
                         f"warm-up and replays counted")
    for row, (kind, fraction, rate, path) in zip(rows, planned, strict=True):
        if abs(rate - row["rate"]) > 1e-6 * rate:
            raise SystemExit(f"{run_dir}: {kind}@{fraction} ran at {row['rate']} req/s, the "
                             f"regenerated trace is at {rate}: different profile or seed?")
        count = row["real"]["num_steps"]
        steps = samples[done:done + count]
        done += count
        add_gaps(steps)
        served = kept.get(f"serve-{kind}-{fraction}.json", {})
        replays.append(Replay(kind, fraction, rate, path, row["real"], steps,
                              served if "requests" in served else None))
    return replays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ferry.common.logging import configure

    configure("sim-check", level="warning")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundled = Profile.load(args.profile)
    device = args.device
    if args.replayed:
        previous = json.loads((Path(args.replayed) / "sim_check.json").read_text())
        device = previous["device"]
        args.warm_up_steps = previous.get("warm_up_steps", 0)
    elif shutil.which("nvidia-smi"):
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip() or device
    with tempfile.TemporaryDirectory() as tmp:
        planned = make_traces(args, bundled.latency, Path(tmp))
        if args.replayed:
            replays = load_replays(args, planned)
        else:
            replays = replay_all(args, planned, Path(tmp))
        result = analyse(args, bundled, replays, device, out_dir, Path(tmp))
    (out_dir / "sim_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))


def analyse(args: argparse.Namespace, bundled: Profile, replays: list[Replay], device: str,
            out_dir: Path, tmp: Path) -> dict:
    """Refit the latency model to the replays' steps, simulate each trace with the bundled
    and the refitted profiles, and compare with the real runs."""
    all_steps = [s for r in replays for s in r.steps]
    if args.serve_dir:
        Path(args.serve_dir).mkdir(parents=True, exist_ok=True)
    insitu = dataclasses.replace(bundled, name=f"{bundled.name}-insitu", device=device,
                                 latency=refit(all_steps), samples=all_steps,
                                 num_blocks=args.kv_blocks)
    insitu_path = out_dir / "profile-insitu.json"
    insitu.save(insitu_path)
    cycle = dataclasses.replace(insitu, name=f"{bundled.name}-insitu-cycle",
                                latency=refit(all_steps, whole_cycle=True))
    cycle_path = out_dir / "profile-insitu-cycle.json"
    cycle.save(cycle_path)
    request_path = fit_request_path(args, replays, cycle_path, tmp)
    rows = []
    for r in replays:
        # the model fitted to the other kinds' steps only: how well a fit carries over to
        # a trace it has not seen (none where the run has one kind: nothing is held out)
        held_out_steps = [s for o in replays if o.kind != r.kind for s in o.steps]
        cross = (dataclasses.replace(insitu, latency=refit(held_out_steps))
                 if held_out_steps else None)
        if cross is not None:
            cross_path = tmp / f"cross-{r.kind}.json"
            cross.save(cross_path)
        scaled = {}
        for factor in (float(f) for f in args.sensitivity.split(",") if f):
            path = tmp / f"scaled-{factor}.json"
            dataclasses.replace(insitu, latency=scale_latency(insitu.latency, factor)).save(path)
            scaled[f"{factor:g}"] = summary(simulate(args, r.trace, path))
        with_path = {}  # the cycle model again, with the request path measured in situ
        if request_path is not None:
            with_path["sim_cycle_path"] = summary(simulate(args, r.trace, cycle_path,
                                                           path=request_path))
            if args.spread_seeds > 0:
                with_path["sim_cycle_spread_path"] = spread_runs(args, r.trace, cycle_path,
                                                                 request_path)
        rows.append({
            "kind": r.kind, "fraction": r.fraction, "rate": r.rate,
            "real": r.real,
            # 5-95% of the real P99 over bootstrap resamples of its requests: a simulated
            # P99 inside it is as close as this many requests can tell
            "real_ttft_p99_interval": None if r.requests is None else
            request_compare.p99_interval(r.requests["requests"]),
            "sim_bundled": summary(simulate(args, r.trace, Path(args.profile))),
            "sim_insitu": summary(simulate(args, r.trace, insitu_path)),
            "sim_cycle": summary(simulate(
                args, r.trace, cycle_path, requests_out=Path(args.serve_dir) /
                f"sim-cycle-{r.kind}-{r.fraction}.json" if args.serve_dir else None)),
            **({"sim_held_out": summary(simulate(args, r.trace, cross_path))}
               if cross is not None else {}),
            **({"sim_cycle_spread": spread_runs(args, r.trace, cycle_path)}
               if args.spread_seeds > 0 else {}),
            **with_path,
            "sim_insitu_scaled": scaled,
            "step_error": {"bundled": step_errors(bundled.latency, r.steps),
                           "insitu": step_errors(insitu.latency, r.steps),
                           "cycle": step_errors(cycle.latency, r.steps, whole_cycle=True),
                           **({"held_out": step_errors(cross.latency, r.steps)}
                              if cross is not None else {})},
        })
    return {"device": device, "model": args.model, "kv_blocks": args.kv_blocks,
            "max_num_batched_tokens": args.max_num_batched_tokens, "num": args.num,
            "max_total_tokens": args.max_total_tokens, "seed": args.seed,
            "tenants": args.tenants,
            "bundled_profile": args.profile, "replayed_from": args.replayed or None,
            "warm_up_steps": getattr(args, "warm_up_steps", 0),
            "request_path_ms": None if request_path is None else {
                "in": request_path.in_s * 1e3, "out": request_path.out_s * 1e3,
                "in_given": args.request_in_ms is not None},
            "coefficients": {"bundled": dataclasses.asdict(bundled.latency),
                             "insitu": dataclasses.asdict(insitu.latency),
                             "cycle": dataclasses.asdict(cycle.latency)},
            "engine_s": {"median": statistics.median(s.get("engine_s", 0.0)
                                                      for s in all_steps),
                         "gap_median": statistics.median(
                             [s["gap_s"] for s in all_steps if s.get("gap_s") is not None]
                             or [0.0]),
                         "mean_share_of_cycle": statistics.fmean(
                             1 - s["step_s"] / cycle_s(s) for s in all_steps)},
            "step_error_all": {"bundled": step_errors(bundled.latency, all_steps),
                               "insitu": step_errors(insitu.latency, all_steps),
                               "cycle": step_errors(cycle.latency, all_steps,
                                                    whole_cycle=True)},
            "rows": rows}


def num(value: float | None, fmt: str) -> str:
    """A table cell: the value formatted, or "–" where there is none."""
    return "–" if value is None else format(value, fmt)


def latency_cells(s: dict) -> str:
    """A run summary's TTFT p50 | TTFT p99 | decode p99 | mean e2e, as table cells."""
    return (f"{num(s['ttft_p50'], '.3f')} | {num(s['ttft_p99'], '.3f')} | "
            f"{num(s['decode_p99'], '.4f')} | {num(s['e2e_mean'], '.2f')}")


def format_table(result: dict) -> str:
    lines = [f"sim check: {result['model']} on {result['device']}, "
             f"{result['kv_blocks']} KV blocks",
             "| trace | rate | run | TTFT p50 s | TTFT p99 s | decode p99 s | e2e mean s "
             "| preempt | req/s | cache hits |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    for row in result["rows"]:
        for run in ("real", "sim_bundled", "sim_insitu", "sim_cycle", "sim_held_out",
                    "sim_cycle_spread"):
            if run not in row:
                continue
            s = row[run]
            lines.append(f"| {row['kind']} | {row['rate']:.2f} | {run} | {latency_cells(s)} | "
                         f"{s['preemptions']} | {num(s['req_per_s'], '.2f')} | "
                         f"{num(s.get('cache_hit_rate'), '.1%')} |")
    factors = sorted({f for row in result["rows"] for f in row.get("sim_insitu_scaled", {})},
                     key=float)
    if factors:
        columns = sorted([*factors, "1"], key=float)  # "1": the in-situ fit itself
        lines += ["", "P99 TTFT (s) with the in-situ step times scaled:",
                  "| trace | rate | real | " + " | ".join(f"x{f}" for f in columns) + " |",
                  "|---|---:|---:|" + "---:|" * len(columns)]
        for row in result["rows"]:
            scaled = row.get("sim_insitu_scaled", {}) | {"1": row["sim_insitu"]}
            cells = [num(scaled.get(f, {}).get("ttft_p99"), ".3f") for f in columns]
            lines.append(f"| {row['kind']} | {row['rate']:.2f} | "
                         f"{num(row['real']['ttft_p99'], '.3f')} | " + " | ".join(cells) + " |")
    spread_rows = [row for row in result["rows"] if "sim_cycle_spread" in row]
    if spread_rows:
        with_path = "sim_cycle_spread_path" in spread_rows[0]
        lines += ["", "P99 TTFT (s), the cycle model with the measured step spread "
                  f"({spread_rows[0]['sim_cycle_spread']['seeds']} seeds)"
                  + (", and with the request path too" if with_path else "")
                  + "; real 5-95%: the real P99 over bootstrap resamples of its requests:",
                  "| trace | rate | real | real 5-95% | deterministic | spread median | "
                  "spread range |" + (" + path median | + path range |" if with_path else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_path else "")]
        for row in spread_rows:
            interval = row.get("real_ttft_p99_interval")
            cells = [row["kind"], f"{row['rate']:.2f}", num(row["real"]["ttft_p99"], ".3f"),
                     "-" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}",
                     num(row["sim_cycle"]["ttft_p99"], ".3f")]
            for key in ("sim_cycle_spread", "sim_cycle_spread_path")[:1 + with_path]:
                sp = row[key]
                cells += [num(sp["ttft_p99"], ".3f"),
                          f"{num(sp['ttft_p99_min'], '.3f')}–{num(sp['ttft_p99_max'], '.3f')}"]
            lines.append("| " + " | ".join(cells) + " |")
    if result.get("request_path_ms"):
        path = result["request_path_ms"]
        source = "given" if path.get("in_given") else "in situ"
        lines += ["", f"request path: {path['in']:.1f} ms in ({source}), {path['out']:.1f} ms "
                  "out (in situ); P50 TTFT (s) real / cycle / cycle + path:"]
        for row in result["rows"]:
            if "sim_cycle_path" in row:
                lines.append(f"  {row['kind']} {row['rate']:.2f}: "
                             f"{num(row['real']['ttft_p50'], '.4f')} / "
                             f"{num(row['sim_cycle']['ttft_p50'], '.4f')} / "
                             f"{num(row['sim_cycle_path']['ttft_p50'], '.4f')}")
    engine = result["engine_s"]
    lines += ["", f"around a step: engine median {engine['median'] * 1e3:.2f} ms, loop gap "
              f"median {engine['gap_median'] * 1e3:.2f} ms; together "
              f"{engine['mean_share_of_cycle']:.1%} of the cycle on average",
              "", "| steps | model | n | median err | p90 err |", "|---|---|---:|---:|---:|"]
    for model, errs in result["step_error_all"].items():
        for kind, e in errs.items():
            lines.append(f"| {kind} | {model} | {e['n']} | {num(e['median'], '.1%')} | "
                         f"{num(e['p90'], '.1%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
