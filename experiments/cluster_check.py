"""The simulator against a real cluster of workers (issue 13 part B): one policy a run.

    python -m experiments.cluster_check --model random:llama3-8b --device cuda --workers 4 \
        --kv-blocks 25000 --policy llumnix --hold-until-room --kinds sharegpt \
        --rates 48,64 --num 1000 --warm-up 30 --out-dir OUT
    python -m experiments.cluster_check --replayed OUT --out-dir OUT2 --spread-seeds 5
                                                  (no GPU: the run's own arguments)
    python -m experiments.cluster_check --rank OUT_1 OUT_2 ...   (the policies side by side)

One run starts `ferry up` with --workers real workers (`--device cuda` puts one on each
GPU), the real gateway and scheduler, and the one --policy (its pending queue on with
--hold-until-room). The load driver (`ferry bench serve`) replays each seeded trace
(experiments.sim_check's traces, each replay with prompts of its own), unmeasured warm-up
first. Every worker logs its steps (`--step-log`, a file each), and the scheduler logs
every committed migration with its downtime.

Then, on the same machine or later on CPU (--replayed): one latency model is fitted to the
whole cycles of every worker's steps (pooled), and `ferry bench sim --instances N` with
the same policy, pending queue, KV and copy rate replays the same traces, deterministic
and with the measured step spread (the median of --spread-seeds seeds). The table puts
P50/P99 TTFT, P99 decode, mean e2e, migrations and preemptions beside the real run's, and
the real migrations' downtime (p50/p99) beside the idle benchmark's.

--rank reads several runs (one policy each) and orders the policies by P99 TTFT for every
trace and rate, real and simulated: the simulator is right about a comparison when the
orders agree.

Files in OUT: cluster_check.json, steps-worker-N.jsonl(.gz), migrations.jsonl (the
scheduler's migration_committed lines), serve-KIND-RATE.json (each replay's per-request
times), profile-cycle.json (the fit; large: left out of what a GPU call brings back).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from experiments import sim_check
from experiments.sim_check import latency_cells, num
from ferry.bench import serve, sim
from ferry.bench import trace as traces
from ferry.bench.local_cluster import start_cluster
from ferry.bench.sim import RequestPath
from ferry.services.worker import step_log
from ferry.services.worker.latency_model import Profile, bundled_profile
from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.model.resolve import resolve_model

MIGRATIONS = "migrations.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--policy", default="llumnix",
                        help="the scheduler's dispatch policy (ferry up --policy)")
    parser.add_argument("--hold-until-room", action=argparse.BooleanOptionalAction,
                        default=True, help="the scheduler's pending queue (both runs)")
    parser.add_argument("--profile", default=str(bundled_profile("llama3-8b-h200")),
                        help="the profile whose model, KV and device fields the in-situ fit "
                             "keeps")
    parser.add_argument("--kv-blocks", type=int, default=25000, help="KV blocks per worker")
    parser.add_argument("--kv-bandwidth-gbs", type=float, default=300.0,
                        help="KV copy rate: what the real scheduler's pull decisions assume "
                             "and the simulator's copies take")
    parser.add_argument("--kinds", default="sharegpt")
    parser.add_argument("--rates", default="",
                        help="req/s of the whole cluster, e.g. 48,64; KIND:RATE for one kind "
                             "(required but with --rank)")
    parser.add_argument("--num", type=int, default=1000, help="requests per trace")
    parser.add_argument("--warm-up", type=int, default=30,
                        help="replay this many requests of each kind first, unmeasured")
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--tenants", type=int, default=traces.CacheShape().tenants)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread-seeds", type=int, default=5,
                        help="also simulate with the measured step spread, from this many "
                             "seeds (0: the deterministic model only)")
    parser.add_argument("--request-path-ms", default="0,0", metavar="IN,OUT",
                        help="the request path around the engine, as a one-worker sim check "
                             "measured it (e.g. 2.1,2.1 on an H100 host)")
    parser.add_argument("--out-dir", default="bench/results/cluster-check")
    parser.add_argument("--replayed", default="",
                        help="no GPU: re-analyse a finished run's directory")
    parser.add_argument("--rank", nargs="+", default=None, metavar="RUN_DIR",
                        help="order the runs' policies by P99 TTFT, real and simulated")


def _trace_args(args: argparse.Namespace) -> argparse.Namespace:
    """What experiments.sim_check.make_traces reads (cluster rates are given, never
    fractions of a one-instance estimate)."""
    return argparse.Namespace(kinds=args.kinds, rates=args.rates, load_fractions="",
                              seed=args.seed, max_total_tokens=args.max_total_tokens,
                              tenants=args.tenants, kv_blocks=args.kv_blocks, num=args.num)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def committed_migrations(log_text: str) -> list[dict]:
    """The scheduler log's migration_committed events (one JSON object a line; other
    lines, and lines that are not JSON, skipped)."""
    out = []
    for line in log_text.splitlines():
        if '"migration_committed"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "migration_committed":
            out.append({k: event.get(k) for k in ("timestamp", "req_id", "downtime_s",
                                                  "total_s", "num_blocks", "src", "dst")})
    return out


def downtime_summary(migrations: list[dict]) -> dict:
    """How many moved, how many with KV (a request still waiting moves without blocks and
    without downtime), and the downtime's p50 / p99 over those with KV (nearest rank, ms;
    None where none)."""
    times = sorted(m["downtime_s"] for m in migrations
                   if m.get("num_blocks") and m.get("downtime_s") is not None)
    out = {"count": len(migrations), "with_kv": len(times),
           "downtime_ms_p50": None, "downtime_ms_p99": None}
    if times:
        def nearest_rank(q: int) -> float:
            return times[max(0, -(-len(times) * q // 100) - 1)] * 1e3
        out |= {"downtime_ms_p50": nearest_rank(50), "downtime_ms_p99": nearest_rank(99)}
    return out


def replay_all(args: argparse.Namespace, planned: list[tuple], tmp: Path
               ) -> tuple[dict[str, int], list[dict]]:
    """Each trace through the real cluster: its summary, per-request times, and what each
    worker's step log and the scheduler's migration log gained meanwhile; and how many
    steps each worker's log has before them (the warm-up's)."""
    out = Path(args.out_dir)
    for stale in out.glob("steps-*.jsonl"):  # a worker appends: start each run empty
        stale.unlink()
    cluster = start_cluster(tmp / "up", workers=args.workers, timeout_s=900, extra=(
        "--model", args.model, "--device", args.device, "--num-blocks", str(args.kv_blocks),
        "--policy", args.policy,
        "--scheduler-arg=--" + ("" if args.hold_until_room else "no-") + "hold-until-room",
        f"--scheduler-arg=--kv-bandwidth-bytes-s={args.kv_bandwidth_gbs * 1e9}",
        f"--worker-arg=--step-log={(out / 'steps-{instance_id}.jsonl').resolve()}",
        f"--worker-arg=--max-num-batched-tokens={args.max_num_batched_tokens}",
        "--gateway-arg=--max-inflight=8192", "--gateway-arg=--max-tokens-limit=32768"))
    scheduler_log = cluster.log_dir / "scheduler.log"
    vocab_size = ModelConfig.from_dir(resolve_model(args.model)).vocab_size

    def serve_args(trace: Path, seed: int, label: str, result: Path) -> argparse.Namespace:
        return argparse.Namespace(
            trace=str(trace), sdk_addr=cluster.sdk_addr, http="",
            admin_addr=cluster.admin_addr, vocab_size=vocab_size, time_scale=1.0,
            max_output_tokens=0, max_prompt_tokens=0, timeout=900.0, seed=seed,
            out=str(result), label=label, no_progress=True)

    replays = []
    try:
        firsts = {}
        for kind, _, _, path in planned:
            firsts.setdefault(kind, path)
        for kind, path in firsts.items():  # the warm-up, unmeasured
            if args.warm_up > 0:
                head = tmp / f"warm-up-{kind}.jsonl"
                head.write_text("".join(path.read_text().splitlines(True)[:args.warm_up]))
                serve.run(serve_args(head, args.seed + 1000, f"{kind} warm-up",
                                     tmp / f"warm-up-{kind}.json"))
                cluster.wait_idle(timeout_s=120)
        time.sleep(0.5)  # the last step lines reach their files
        logs = sorted(out.glob("steps-*.jsonl"))
        marks = {p.name: _lines(p) for p in logs}
        migrations_seen = len(committed_migrations(scheduler_log.read_text()))
        warm_up_steps = dict(marks)
        for index, (kind, fraction, rate, path) in enumerate(planned):
            result = serve.run(serve_args(path, args.seed + 1 + index, f"{kind}@{rate}",
                                          out / f"serve-{kind}-{rate:g}.json"))
            cluster.wait_idle(timeout_s=300)
            time.sleep(0.5)
            steps = {}
            for p in sorted(out.glob("steps-*.jsonl")):
                now = _lines(p)
                steps[p.name] = now - marks.get(p.name, 0)
                marks[p.name] = now
            moved = committed_migrations(scheduler_log.read_text())
            replays.append({"kind": kind, "rate": rate, "fraction": fraction,
                            "real": sim_check.summary(result)
                            | {"migrations": result["num_migrations"]},
                            "real_migrations": downtime_summary(moved[migrations_seen:]),
                            "steps": steps})
            migrations_seen = len(moved)
            print(f"replayed {kind} at {rate:.2f} req/s: p99 ttft "
                  f"{result['prefill_latency_s']['p99']:.3f} s, "
                  f"{result['num_migrations']} migrations", flush=True)
        (out / MIGRATIONS).write_text("".join(
            json.dumps(m) + "\n" for m in committed_migrations(scheduler_log.read_text())))
    finally:
        cluster.stop()
    for p in out.glob("steps-*.jsonl"):  # a worker that logged its first step after that
        warm_up_steps.setdefault(p.name, 0)
    return warm_up_steps, replays


def pooled_steps(out: Path, warm_up_steps: dict[str, int]) -> list[dict]:
    """Every worker's measured steps (after its warm-up), gaps taken within each worker."""
    pooled = []
    for name, skip in sorted(warm_up_steps.items()):
        plain = out / name
        samples = step_log.read(plain if plain.exists() else out / f"{name}.gz")[skip:]
        step_log.add_gaps(samples)
        pooled += samples
    return pooled


def simulate(args: argparse.Namespace, trace: Path, profile: Path,
             spread_seed: int | None) -> dict:
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    path = RequestPath.parse(args.request_path_ms)
    result = sim.run(parser.parse_args([
        "--trace", str(trace), "--instances", str(args.workers), "--policy", args.policy,
        "--profile", str(profile), "--kv-blocks", str(args.kv_blocks),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--migration-bandwidth-gbs", str(args.kv_bandwidth_gbs), "--distinct-prompts",
        "--request-path-ms", f"{path.in_s * 1e3:.4f},{path.out_s * 1e3:.4f}",
        *(["--hold-until-room"] if args.hold_until_room else []),
        *(["--no-step-spread"] if spread_seed is None
          else ["--step-spread-seed", str(spread_seed)])]))
    return sim_check.summary(result) | {"migrations": result["num_migrations"]}


def analyse(args: argparse.Namespace, planned: list[tuple], replays: list[dict],
            warm_up_steps: dict[str, int]) -> dict:
    out = Path(args.out_dir)
    samples = pooled_steps(out, warm_up_steps)
    base = Profile.load(args.profile)
    cycle = dataclasses.replace(base, name=f"{base.name}-cluster-cycle",
                                latency=step_log.fit(samples, whole_cycle=True),
                                samples=[], num_blocks=args.kv_blocks)
    cycle_path = out / "profile-cycle.json"
    cycle.save(cycle_path)
    rows = []
    for (*_, trace), replay in zip(planned, replays, strict=True):
        row = replay | {"sim": simulate(args, trace, cycle_path, None)}
        spread = [simulate(args, trace, cycle_path, seed) for seed in range(args.spread_seeds)]
        if spread:  # none asked on a GPU call short of time: the re-analysis adds them
            median = {k: statistics.median(s[k] for s in spread)
                      if all(s[k] is not None for s in spread) else None for k in spread[0]}
            p99s = sorted(s["ttft_p99"] for s in spread)
            row["sim_spread"] = median | {"ttft_p99_min": p99s[0], "ttft_p99_max": p99s[-1],
                                          "seeds": len(spread)}
        rows.append(row)
    return {"model": args.model, "workers": args.workers, "policy": args.policy,
            "hold_until_room": args.hold_until_room, "kv_blocks": args.kv_blocks,
            "kv_bandwidth_gbs": args.kv_bandwidth_gbs, "num": args.num, "seed": args.seed,
            "max_total_tokens": args.max_total_tokens, "tenants": args.tenants,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "request_path_ms": args.request_path_ms, "warm_up_steps": warm_up_steps,
            "num_steps": len(samples), "coefficients": dataclasses.asdict(cycle.latency),
            "step_error": sim_check.step_errors(cycle.latency, samples, whole_cycle=True),
            "rows": rows}


def policy_label(result: dict) -> str:
    return result["policy"] + (" + pending queue" if result["hold_until_room"] else "")


def format_table(result: dict) -> str:
    lines = [f"cluster check: {result['workers']} x {result['model']}, {result['kv_blocks']} "
             f"KV blocks each, {policy_label(result)}",
             "| trace | rate | run | TTFT p50 s | TTFT p99 s | decode p99 s | e2e mean s "
             "| migrations | preempt | req/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    for row in result["rows"]:
        for run in ("real", "sim", "sim_spread"):
            if run not in row:
                continue
            s = row[run]
            lines.append(f"| {row['kind']} | {row['rate']:.2f} | {run} | {latency_cells(s)} | "
                         f"{s['migrations']} | {s['preemptions']} | "
                         f"{num(s['req_per_s'], '.2f')} |")
    lines += ["", "Real migrations (the scheduler's migration_committed events):",
              "| trace | rate | committed | with KV | downtime p50 ms | downtime p99 ms |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        m = row["real_migrations"]
        lines.append(f"| {row['kind']} | {row['rate']:.2f} | {m['count']} | {m['with_kv']} | "
                     f"{num(m['downtime_ms_p50'], '.2f')} | {num(m['downtime_ms_p99'], '.2f')} |")
    err = result["step_error"]
    lines += ["", f"cycle fit over {result['num_steps']} steps of {result['workers']} workers: "
              "median error " + ", ".join(f"{k} {num(v['median'], '.1%')} (n {v['n']})"
                                          for k, v in err.items())]
    return "\n".join(lines)


def simulated_p99(row: dict) -> float:
    """The simulator's P99 TTFT for a row: the spread's median, else the deterministic."""
    return (row["sim_spread"] if "sim_spread" in row else row["sim"])["ttft_p99"]


def rank(results: list[dict]) -> list[dict]:
    """For each (kind, rate) every run has: the policies ordered by P99 TTFT, real and
    simulated, and whether the orders agree."""
    keys = [(r["kind"], r["rate"]) for r in results[0]["rows"]]
    out = []
    for kind, rate in keys:
        entries = []
        for result in results:
            row = next((r for r in result["rows"] if (r["kind"], r["rate"]) == (kind, rate)),
                       None)
            if row is not None:
                entries.append((policy_label(result), row["real"]["ttft_p99"],
                                simulated_p99(row)))
        real = [e[0] for e in sorted(entries, key=lambda e: e[1])]
        simulated = [e[0] for e in sorted(entries, key=lambda e: e[2])]
        out.append({"kind": kind, "rate": rate, "real_order": real, "sim_order": simulated,
                    "p99": {e[0]: {"real": e[1], "sim": e[2]} for e in entries},
                    "same_order": real == simulated})
    return out


RUN_FIELDS = ("model", "workers", "policy", "hold_until_room", "kv_blocks", "kv_bandwidth_gbs",
              "num", "seed", "max_total_tokens", "tenants", "max_num_batched_tokens",
              "request_path_ms")


def recorded(args: argparse.Namespace, done: dict) -> None:
    """A finished run's own arguments into args (--replayed): its traces, policy, cluster
    and simulator settings; what the run did not record keeps the command line's."""
    for field in RUN_FIELDS:
        setattr(args, field, done.get(field, getattr(args, field)))
    args.kinds = ",".join(dict.fromkeys(row["kind"] for row in done["rows"]))
    args.rates = ",".join(f"{row['kind']}:{row['rate']!r}" for row in done["rows"])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a --replayed run's own arguments filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.replayed:
        recorded(args, json.loads((Path(args.replayed) / "cluster_check.json").read_text()))
    if not args.rank and not args.rates:
        parser.error("--rates is required (but with --rank or --replayed)")
    return args


def print_rank(run_dirs: list[str]) -> None:
    results = [json.loads((Path(d) / "cluster_check.json").read_text()) for d in run_dirs]
    for entry in rank(results):
        print(f"{entry['kind']} {entry['rate']:.2f}: real {' < '.join(entry['real_order'])}"
              f"; simulated {' < '.join(entry['sim_order'])}; "
              f"{'same order' if entry['same_order'] else 'ORDER DIFFERS'}")


def run(args: argparse.Namespace) -> dict:
    """One run (or its re-analysis): cluster_check.json in --out-dir, the table printed."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        planned = sim_check.make_traces(_trace_args(args), Profile.load(args.profile).latency,
                                        Path(tmp))
        if args.replayed:
            done = json.loads((Path(args.replayed) / "cluster_check.json").read_text())
            replays = [{k: r[k] for k in ("kind", "rate", "fraction", "real",
                                          "real_migrations", "steps")} for r in done["rows"]]
            warm_up_steps = done["warm_up_steps"]
            if Path(args.replayed).resolve() != out.resolve():
                for p in Path(args.replayed).glob("steps-*"):
                    (out / p.name).write_bytes(p.read_bytes())
        else:
            warm_up_steps, replays = replay_all(args, planned, Path(tmp))
        result = analyse(args, planned, replays, warm_up_steps)
    (out / "cluster_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.rank:
        print_rank(args.rank)
        return
    from ferry.common.logging import configure

    configure("cluster-check", level="warning")  # the in-process simulator logs decisions
    run(args)


if __name__ == "__main__":
    main()
