"""The real worker and the simulator request by request, from a finished sim_check run.

    python -m experiments.request_compare RUN_DIR [--out compare.json]

RUN_DIR holds what `python -m experiments.sim_check --serve-dir RUN_DIR/serve` kept (or
its archive serve.tar.gz, as bench/gpu_checks.sh returns it): per replay, the load
driver's request times (serve-KIND-FRACTION.json, "requests") and the cycle model's
simulated ones (sim-cycle-KIND-FRACTION.json), plus the worker's step log
(steps.jsonl[.gz], wall-clock "t" at each step's end) and sim_check.json.

Per replay it prints:

- TTFT real - simulated, per request (p10 / p50 / p90, ms): a constant offset is a cost
  the simulator lacks on every request; a spread is step noise and queueing;
- the way out: from the end of the step that produced a request's first token (the
  latest step to end before the client saw it) to the client, p50 / p90 ms. The
  simulator counts zero here;
- arrival drift (multi-turn): a later turn is sent a think time after the previous one
  ended, so each turn the real run spends longer moves the session's next arrivals later
  than the simulator's. p50 and p90 of real - simulated arrival over the later turns,
  and over the last third of the run;
- the three slowest real first tokens beside the simulator's for the same requests.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import statistics
import tarfile
from pathlib import Path

import numpy as np

from ferry.services.worker import step_log


def load_runs(run_dir: Path) -> dict[str, dict]:
    """name -> parsed JSON of every serve-*.json and sim-cycle-*.json of the run."""
    out: dict[str, dict] = {}
    archive = run_dir / "serve.tar.gz"
    if archive.exists():
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name.endswith(".json"):
                    out[name] = json.load(io.TextIOWrapper(tar.extractfile(member)))
    serve_dir = run_dir / "serve"
    if serve_dir.is_dir():
        for path in serve_dir.glob("*.json"):
            out[path.name] = json.loads(path.read_text())
    return out


def by_index(requests: dict) -> dict[int, dict]:
    """trace_index -> the request's row as a dict (bench/metrics.py request_rows)."""
    return {row[0]: dict(zip(requests["columns"], row, strict=True))
            for row in requests["rows"]}


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p10": None, "p50": None, "p90": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(values), "p10": at(0.1), "p50": statistics.median(ordered),
            "p90": at(0.9)}


def ttft(row: dict) -> float | None:
    if row["first_token_s"] is None or row["error"] is not None:
        return None
    return row["first_token_s"] - row["arrival_s"]


def p99_interval(requests: dict, *, resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float] | None:
    """The 5th and 95th percentiles of P99 TTFT over bootstrap resamples of the requests
    (None for fewer than 20): how far a P99 of this many requests is from settled. With
    100 requests P99 is the second-slowest, and near the knee one request's wait moves
    it by seconds."""
    ttfts = np.array([t for t in (ttft(r) for r in by_index(requests).values())
                      if t is not None])
    if ttfts.size < 20:
        return None
    rng = np.random.default_rng(seed)
    p99s = np.percentile(rng.choice(ttfts, size=(resamples, ttfts.size)), 99, axis=1)
    low, high = np.percentile(p99s, [5, 95])
    return float(low), float(high)


def way_out(real: dict[int, dict], start_unix: float, step_ends: list[float]) -> list[float]:
    """Per request: its first token at the client - the end of the latest step before it."""
    out = []
    for row in real.values():
        if row["first_token_s"] is None:
            continue
        seen = start_unix + row["first_token_s"]
        i = bisect.bisect_right(step_ends, seen) - 1
        if i >= 0:
            out.append(seen - step_ends[i])
    return out


def both_served(real: dict[int, dict], sim: dict[int, dict]) -> list[int]:
    """Trace indices with a first token on both sides."""
    return [i for i in real if i in sim and ttft(real[i]) is not None
            and ttft(sim[i]) is not None]


def ttft_offsets(real_requests: dict, simulated: dict) -> list[float]:
    """Real TTFT - simulated TTFT of every request served on both sides."""
    real, sim = by_index(real_requests), by_index(simulated)
    return [ttft(real[i]) - ttft(sim[i]) for i in both_served(real, sim)]


def compare(serve: dict, simulated: dict, step_ends: list[float]) -> dict:
    real, sim = by_index(serve["requests"]), by_index(simulated)
    both = both_served(real, sim)
    ttft_diff = ttft_offsets(serve["requests"], simulated)
    # A session's first turn arrives on the trace's clock on both sides; later turns (the
    # trace's arrival_s does not hold them) follow the previous turn's end.
    end = max((real[i]["arrival_s"] for i in both), default=0.0)
    drift = [real[i]["arrival_s"] - sim[i]["arrival_s"] for i in both]
    late_drift = [real[i]["arrival_s"] - sim[i]["arrival_s"] for i in both
                  if real[i]["arrival_s"] >= 2 * end / 3]
    slowest = sorted(both, key=lambda i: ttft(real[i]), reverse=True)[:3]
    return {
        "requests": len(both),
        "ttft_real_minus_sim_s": quantiles(ttft_diff),
        "way_out_s": quantiles(way_out(real, serve["start_unix"], step_ends)),
        "arrival_drift_s": quantiles(drift),
        "arrival_drift_last_third_s": quantiles(late_drift),
        "slowest": [{"trace_index": i, "arrival_s": real[i]["arrival_s"],
                     "prompt_tokens": real[i]["prompt_tokens"],
                     "ttft_real_s": ttft(real[i]), "ttft_sim_s": ttft(sim[i]),
                     "sim_arrival_s": sim[i]["arrival_s"]} for i in slowest],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="", help="write the comparison JSON here")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    check = json.loads((run_dir / "sim_check.json").read_text())
    plain = run_dir / "steps.jsonl"
    steps = step_log.read(plain if plain.exists() else run_dir / "steps.jsonl.gz")
    step_ends = sorted(s["t"] for s in steps)
    runs = load_runs(run_dir)
    result = {}
    for row in check["rows"]:
        key = f"{row['kind']}-{row['fraction']}"
        serve, simulated = runs.get(f"serve-{key}.json"), runs.get(f"sim-cycle-{key}.json")
        if serve is None or simulated is None or "requests" not in serve:
            print(f"{key}: no per-request times kept (an older run?)")
            continue
        result[key] = compare(serve, simulated, step_ends) | {"rate": row["rate"]}
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def format_table(result: dict) -> str:
    def ms(q: dict, key: str) -> str:
        return "-" if q[key] is None else f"{1e3 * q[key]:.1f}"

    lines = ["| replay | rate | n | TTFT real-sim p10 / p50 / p90 ms | way out p50 / p90 ms "
             "| arrival drift p50 / p90 ms (last third p50) |",
             "|---|---:|---:|---|---|---|"]
    for key, r in result.items():
        d, w, a, late = (r["ttft_real_minus_sim_s"], r["way_out_s"], r["arrival_drift_s"],
                         r["arrival_drift_last_third_s"])
        lines.append(f"| {key} | {r['rate']:.2f} | {r['requests']} | {ms(d, 'p10')} / "
                     f"{ms(d, 'p50')} / {ms(d, 'p90')} | {ms(w, 'p50')} / {ms(w, 'p90')} | "
                     f"{ms(a, 'p50')} / {ms(a, 'p90')} ({ms(late, 'p50')}) |")
    lines.append("")
    lines.append("slowest real first tokens (s): replay, trace index, prompt tokens, "
                 "real TTFT / simulated TTFT, real / simulated arrival")
    for key, r in result.items():
        for s in r["slowest"]:
            lines.append(f"  {key} #{s['trace_index']} P={s['prompt_tokens']}: "
                         f"{s['ttft_real_s']:.3f} / {s['ttft_sim_s']:.3f}, "
                         f"{s['arrival_s']:.2f} / {s['sim_arrival_s']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
