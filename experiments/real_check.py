"""`python -m experiments.real_check`: the simulator's verdict checked on real processes.

For each policy, the same trace runs twice: through a real cluster (`ferry up
--executor sim`: real gateway, scheduler, workers, ZMQ and migrations; only model
compute is the latency model) driven by the load driver (`ferry bench serve`), and
through the discrete-event simulator with the same instances, profile and KV size.
Prints both side by side; the question is whether they point the same way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ferry.bench import serve, sim
from ferry.bench.local_cluster import start_cluster


def real_run(args: argparse.Namespace, policy: str, tmp: Path) -> dict:
    slow = args.slowdown
    cluster = start_cluster(tmp / policy, workers=args.workers, extra=(
        "--executor", "sim", "--sim-profile", args.profile, "--num-blocks", str(args.kv_blocks),
        "--sim-speedup", str(1.0 / slow), "--worker-arg=--report-interval=" + str(0.05 * slow),
        "--policy", policy, f"--scheduler-arg=--migration-interval-s={0.05 * slow}",
        # the KV copy rate ferry's pull decisions assume: the simulator's (sim_run)
        f"--scheduler-arg=--kv-bandwidth-bytes-s={args.kv_bandwidth_gbs * 1e9}",
        # The scheduler's pending queue as asked (bench.sim's default is off, and so is
        # this check's: session 1's comparison of the policies dispatched at once).
        "--scheduler-arg=--" + ("" if args.hold_until_room else "no-") + "hold-until-room",
        "--gateway-arg=--max-inflight=8192"))
    try:
        parser = argparse.ArgumentParser()
        serve.add_arguments(parser)  # the driver's own defaults for everything not set here
        result = serve.run(parser.parse_args([
            "--trace", args.trace, "--sdk-addr", cluster.sdk_addr,
            "--admin-addr", cluster.admin_addr, "--label", policy, "--no-progress",
            "--time-scale", str(slow),
            "--out", str(Path(args.out_dir) / f"serve-{policy}.json")]))
    finally:
        cluster.stop()
    return in_trace_time(result, slow)


LATENCY_KEYS = ("prefill_latency_s", "decode_latency_s", "e2e_latency_s")


def in_trace_time(result: dict, slowdown: float) -> dict:
    """A slowed-down run's latencies back on the trace's clock (divided by slowdown)."""
    if slowdown == 1.0:
        return result
    out = dict(result)
    for key in LATENCY_KEYS:
        out[key] = {k: v / slowdown if isinstance(v, int | float) else v  # None: no requests
                    for k, v in result[key].items()}
    out["by_priority"] = {name: in_trace_time(part, slowdown)
                          for name, part in result.get("by_priority", {}).items()}
    return out


def sim_run(args: argparse.Namespace, policy: str) -> dict:
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    sim_args = parser.parse_args([
        "--trace", args.trace, "--instances", str(args.workers), "--policy", policy,
        "--profile", args.profile, "--kv-blocks", str(args.kv_blocks),
        "--max-num-batched-tokens", "2048", "--migration-interval-s", "0.05",
        "--migration-bandwidth-gbs", str(args.kv_bandwidth_gbs),
        *(["--hold-until-room"] if args.hold_until_room else [])])
    return sim.run(sim_args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--profile", default="services/worker/profiles/llama2-7b-h200.json")
    parser.add_argument("--kv-blocks", type=int, default=1000)
    parser.add_argument("--policies", default="least_load,llumnix")
    parser.add_argument("--out-dir", default="bench/results/real-check")
    parser.add_argument("--kv-bandwidth-gbs", type=float, default=200.0,
                        help="KV copy rate: the simulator's copies, and what both schedulers' "
                             "pull decisions assume")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="run the real cluster this many times slower than the trace "
                             "(modelled steps, arrivals, think times, report and migration "
                             "intervals), so its CPU overheads weigh that much less on a small "
                             "machine; latencies are reported on the trace's clock")
    parser.add_argument("--hold-until-room", action="store_true",
                        help="the scheduler's pending queue on, in both runs")
    args = parser.parse_args(argv)
    from ferry.common.logging import configure

    configure("real-check", level="warning")  # the in-process simulator logs decisions
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            real = real_run(args, policy, Path(tmp))
            simulated = sim_run(args, policy)
            rows.append({"policy": policy, "real": real, "sim": simulated})
    (Path(args.out_dir) / "real_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'policy':<15} {'run':<5} {'p50 prefill':>11} {'p99 prefill':>11} "
          f"{'p99 decode':>10} {'mean e2e':>9} {'hit rate':>8} {'migrations':>10} "
          f"{'preempt':>8}")
    for row in rows:
        for name in ("real", "sim"):
            r = row[name]
            hit = r.get("cache_hit_rate")
            print(f"{row['policy']:<15} {name:<5} {r['prefill_latency_s']['p50']:>11.3f} "
                  f"{r['prefill_latency_s']['p99']:>11.3f} {r['decode_latency_s']['p99']:>10.4f} "
                  f"{r['e2e_latency_s']['mean']:>9.3f} "
                  f"{'—' if hit is None else format(hit, '.3f'):>8} {r['num_migrations']:>10} "
                  f"{r['num_preemptions']:>8}")
        real, simulated = (row[k]["prefill_latency_s"]["p99"] for k in ("real", "sim"))
        print(f"{row['policy']:<15} p99 prefill real / sim = {real / simulated:.2f}")


if __name__ == "__main__":
    main()
