"""A profile against the real runs of earlier sim checks, without a GPU.

    python -m experiments.profile_check --profile services/worker/profiles/X.json \
        [--request-path-ms IN,OUT] [--spread-seeds 5] RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished `experiments.sim_check` run (its sim_check.json: the real
results, the KV size, the request count and each replay's trace kind and rate). Every
replay's trace is regenerated from its seed, as `sim_check --replayed` does, and
simulated with this one profile (its measured spread drawn from --spread-seeds seeds,
the median kept) at the run's KV size; the table puts P99 TTFT, P50 TTFT and mean e2e
beside the real run's. This is how a bundled serving profile (one fit pooled over several
runs' step logs) is checked against each run it came from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from experiments import sim_check
from ferry.bench import trace as traces
from ferry.bench.sim import RequestPath
from ferry.services.worker.latency_model import Profile


def check_run(run_dir: Path, profile: Path, path: RequestPath, seeds: int,
              tmp: Path) -> list[dict]:
    """One row per replay of the run: the real summary beside the simulated one."""
    done = json.loads((run_dir / "sim_check.json").read_text())
    parser = argparse.ArgumentParser()
    sim_check.add_arguments(parser)
    rates = ",".join(f"{row['kind']}:{row['rate']!r}" for row in done["rows"])
    kinds = ",".join(dict.fromkeys(row["kind"] for row in done["rows"]))
    args = parser.parse_args([
        "--kinds", kinds, "--rates", rates, "--num", str(done["num"]),
        "--kv-blocks", str(done["kv_blocks"]), "--spread-seeds", str(seeds),
        "--max-num-batched-tokens", str(done["max_num_batched_tokens"]),
        # runs made before these were kept ran the defaults
        "--max-total-tokens", str(done.get("max_total_tokens", 4096)),
        "--seed", str(done.get("seed", 0)),
        "--tenants", str(done.get("tenants", traces.CacheShape().tenants))])
    planned = sim_check.make_traces(args, Profile.load(profile).latency, tmp)
    rows = []
    for (kind, _, rate, trace), row in zip(planned, done["rows"], strict=True):
        simulated = sim_check.spread_runs(args, trace, profile, path)
        rows.append({"run": str(run_dir), "kind": kind, "rate": rate,
                     "kv_blocks": done["kv_blocks"], "num": done["num"],
                     "real": row["real"], "sim": simulated})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--request-path-ms", default="0,0", metavar="IN,OUT")
    parser.add_argument("--spread-seeds", type=int, default=5)
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    from ferry.common.logging import configure

    configure("profile-check", level="warning")
    if args.spread_seeds < 1:
        parser.error("--spread-seeds: 1 or more")
    path = RequestPath.parse(args.request_path_ms)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in args.run_dirs:
            rows += check_run(Path(run_dir), Path(args.profile), path, args.spread_seeds,
                              Path(tmp))
    print(f"{Path(args.profile).name}, request path {args.request_path_ms} ms, "
          f"median of {args.spread_seeds} spread seeds")
    print("| run | KV blocks | n | trace | rate | P99 TTFT real / sim (÷) | P50 TTFT real / sim "
          "| e2e mean real / sim |")
    print("|---|---:|---:|---|---:|---|---|---|")
    for r in rows:
        real, sim = r["real"], r["sim"]
        print(f"| {Path(r['run']).parent.name}/{Path(r['run']).name} | {r['kv_blocks']} | "
              f"{r['num']} | {r['kind']} | {r['rate']:.2f} | {real['ttft_p99']:.3f} / "
              f"{sim['ttft_p99']:.3f} ({sim['ttft_p99'] / real['ttft_p99']:.2f}) | "
              f"{real['ttft_p50']:.3f} / {sim['ttft_p50']:.3f} | {real['e2e_mean']:.2f} / "
              f"{sim['e2e_mean']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
