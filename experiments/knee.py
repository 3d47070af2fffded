"""Where P99 TTFT turns up, real and simulated, from one or more sim_check runs.

    python -m experiments.knee RUN_DIR [RUN_DIR ...] [--kind sharegpt] [--threshold-s 1.0]
                               [--model sim_cycle_spread_path]

Near the knee P99 TTFT moves by orders of magnitude for a few percent of rate, and a
P99 of 100 requests is the second-slowest one: comparing it at one rate asks more than
either side can answer. The rate at which P99 TTFT first reaches --threshold-s is
stable: it is read off each side's P99-vs-rate curve (every row of the given runs with
the trace kind, sorted by rate), interpolating log(P99) linearly between the two rates
around the crossing. Prints both knees and their ratio; None where a side never
crosses (or starts above) the threshold in the rates run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def knee_rate(points: list[tuple[float, float]], threshold_s: float) -> float | None:
    """The rate at which P99 first reaches threshold_s: points are (rate, P99) pairs."""
    ordered = sorted(points)
    if not ordered or ordered[0][1] >= threshold_s:
        return None
    for (r0, p0), (r1, p1) in zip(ordered, ordered[1:], strict=False):
        if p1 >= threshold_s > p0:
            share = math.log(threshold_s / p0) / math.log(p1 / p0)
            return r0 + share * (r1 - r0)
    return None


def curves(run_dirs: list[Path], kind: str, model: str) -> dict[str, list[tuple[float, float]]]:
    """{"real": [(rate, P99)], model: [...]} over every row of the runs with this kind."""
    out: dict[str, list[tuple[float, float]]] = {"real": [], model: []}
    for run_dir in run_dirs:
        for row in json.loads((run_dir / "sim_check.json").read_text())["rows"]:
            if row["kind"] != kind:
                continue
            if model not in row:
                raise SystemExit(f"{run_dir}: no {model} (re-analyse it with --replayed)")
            out["real"].append((row["rate"], row["real"]["ttft_p99"]))
            out[model].append((row["rate"], row[model]["ttft_p99"]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--kind", default="sharegpt")
    parser.add_argument("--threshold-s", type=float, default=1.0)
    parser.add_argument("--model", default="sim_cycle_spread_path",
                        help="which simulation of the rows (a key of sim_check.json's rows)")
    args = parser.parse_args(argv)
    got = curves([Path(d) for d in args.run_dirs], args.kind, args.model)
    print(f"{args.kind}: P99 TTFT by rate (s)")
    for (rate, real), (_, simulated) in zip(sorted(got["real"]), sorted(got[args.model]),
                                            strict=True):
        print(f"  {rate:7.2f}  real {real:8.3f}  {args.model} {simulated:8.3f}")
    knees = {side: knee_rate(points, args.threshold_s) for side, points in got.items()}
    ratio = (knees[args.model] / knees["real"]
             if None not in knees.values() else None)
    print(f"knee (P99 TTFT reaches {args.threshold_s:g} s): real "
          f"{knees['real'] and round(knees['real'], 2)} req/s, simulated "
          f"{knees[args.model] and round(knees[args.model], 2)} req/s"
          + (f", ratio {ratio:.3f}" if ratio is not None else ""))


if __name__ == "__main__":
    main()
