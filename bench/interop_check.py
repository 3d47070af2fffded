"""`python -m ferry.bench.interop_check`: a third-party benchmark client's numbers beside
`ferry bench serve`'s, on the same requests (issue 16).

Starts a cluster (`ferry up`, the sim executor by default), makes one trace and sends it
twice over HTTP, streaming /v1/completions: once with NVIDIA's aiperf (its own virtual
environment, .venv-interop: `make interop`), once with `ferry bench serve --http`. Every
request is the same body in both: the same prompt token ids, max_tokens, ignore_eos and
include_usage (aiperf sends `serve.http_body`'s bodies verbatim, through its mooncake_trace
input's "payload" field). Closed loop by default (--concurrency N in flight, each sent when
one finishes, in both clients), or the trace's arrival times (--concurrency 0 --rate R:
aiperf's fixed schedule, `ferry bench serve`'s open loop). Prints TTFT and ITL p50 / p99 of
both side by side, both computed from per-request values the same way (bench/metrics.py
`stats`): TTFT = send to first token, ITL = (last token - first token) / (tokens - 1).

Each client runs --rounds times, alternating, and the medians over rounds close the table.
Around each run the gateway's own histograms (/metrics) give its mean TTFT and ITL over the
same requests: "TTFT -gw" is what the client adds to what the gateway measured (HTTP, its
own event loop), which tells a client's measuring apart from the load the cluster happened
to meet (on a shared machine, run-to-run swings exceed the clients' difference).

Also the helpers tests/e2e/test_interop_aiperf.py runs aiperf with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ferry.bench.local_cluster import REPO, start_cluster

# The interop virtual environment (`make interop`, from requirements/interop.lock).
AIPERF = REPO / ".venv-interop" / "bin" / "aiperf"
# The repository id the local model's tokenizer is filed under in hub_cache.
TOKENIZER_REPO_ID = "ferry-local/tokenizer"


def hub_cache(model_dir: Path, hub_dir: Path) -> str:
    """File model_dir's tokenizer in a Hugging Face hub cache at hub_dir, as a download of
    repository TOKENIZER_REPO_ID at revision main would be; that id.

    aiperf 0.13 with HF_HUB_OFFLINE=1 loads every tokenizer through
    `snapshot_download(name, local_files_only=True)`, which refuses a local directory
    ("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"): an aiperf bug
    (ai-dynamo/aiperf pull request 1339, open). A cache entry of our own keeps it offline
    with nothing patched."""
    snapshot_id = "0" * 40  # any commit hash: refs/main names it
    repo = hub_dir / f"models--{TOKENIZER_REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / snapshot_id
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot_id)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        link = snapshot / name
        if not link.exists():
            link.symlink_to(Path(model_dir).resolve() / name)
    return TOKENIZER_REPO_ID


def aiperf_env(work_dir: Path, model_dir: Path) -> tuple[dict[str, str], str]:
    """aiperf's environment (offline: it never reaches the Hugging Face hub) and the
    tokenizer name to pass it."""
    hub = work_dir / "hf-hub"
    tokenizer = hub_cache(model_dir, hub)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "NO_COLOR": "1",
           "COLUMNS": "160"}
    return env, tokenizer


def aiperf_profile(*, url: str, model: str, tokenizer: str, artifact_dir: Path,
                   args: tuple[str, ...]) -> list[str]:
    """The `aiperf profile` command line: streaming, token counts from the server's usage
    (include_usage; our random-weight model's text does not re-tokenize to the same count),
    no GPU telemetry (none here), no live UI; the rest (endpoint, load, dataset) is args."""
    return [str(AIPERF), "profile", "--model", model, "--url", url, "--streaming",
            "--tokenizer", tokenizer, "--use-server-token-count", "--no-gpu-telemetry",
            "--ui-type", "none", "--artifact-dir", str(artifact_dir), *args]


def run_aiperf(command: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Run it; its temporary files (IPC sockets, the dataset's memory maps) in a folder of
    their own under /tmp, removed after (a socket path must stay under 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="aiperf-") as tmp:
        out = subprocess.run(command, env={**env, "TMPDIR": tmp}, capture_output=True,
                             text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"aiperf exited {out.returncode}:\n{out.stdout[-4000:]}\n"
                           f"{out.stderr[-4000:]}")


def read_records(artifact_dir: Path) -> list[dict]:
    """aiperf's per-request export (profile_export.jsonl): {"metadata", "metrics", "error"}."""
    path = artifact_dir / "profile_export.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(artifact_dir: Path) -> dict:
    """aiperf's aggregate export (profile_export_aiperf.json): metric -> {unit, avg, p50, ..}."""
    return json.loads((artifact_dir / "profile_export_aiperf.json").read_text())


def percentiles(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p99 as bench/metrics.py `stats` takes them (numpy, linear interpolation)."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p99": float(np.percentile(arr, 99))}


# ---- the comparison ---------------------------------------------------------------------------

# The gateway's own histograms (its /metrics): arrival to first token, and per token after.
GATEWAY_HISTOGRAMS = {"ttft": "ferry:time_to_first_token_seconds",
                      "itl": "ferry:inter_token_latency_seconds"}


def gateway_sums(base_url: str) -> dict[str, float]:
    """{"ttft_sum", "ttft_count", "itl_sum", "itl_count"} over every series of the
    gateway's histograms, in seconds."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    sums = {f"{key}_{part}": 0.0 for key in GATEWAY_HISTOGRAMS for part in ("sum", "count")}
    for line in text.splitlines():
        for key, name in GATEWAY_HISTOGRAMS.items():
            for part in ("sum", "count"):
                if line.startswith(f"{name}_{part}"):
                    sums[f"{key}_{part}"] += float(line.rsplit(" ", 1)[1])
    return sums


def gateway_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean TTFT and ITL (ms) the gateway measured between two gateway_sums."""
    out: dict[str, float | None] = {}
    for key in GATEWAY_HISTOGRAMS:
        count = after[f"{key}_count"] - before[f"{key}_count"]
        out[f"{key}_ms_mean"] = ((after[f"{key}_sum"] - before[f"{key}_sum"]) / count * 1e3
                                 if count > 0 else None)
    out["num_first_tokens"] = after["ttft_count"] - before["ttft_count"]
    return out



def make_trace(args: argparse.Namespace) -> list[dict]:
    from ferry.bench.trace import sample_arrivals

    rng = np.random.default_rng(args.seed)
    arrivals = (sample_arrivals(args.num_requests, args.rate, 1.0, rng) if args.rate > 0
                else np.zeros(args.num_requests))
    return [{"arrival_s": round(float(t), 6), "prompt_tokens": args.prompt_tokens,
             "output_tokens": args.output_tokens, "priority": "normal"} for t in arrivals]


def aiperf_run(args: argparse.Namespace, cluster, trace: list[dict], work: Path,
               name: str) -> dict:
    """aiperf on the trace's bodies; TTFT and ITL p50/p99 in ms."""
    from ferry.bench import serve
    from ferry.bench.workload import Workload

    workload = Workload(trace, vocab_size=args.vocab_size, seed=args.seed)
    dataset = work / f"{name}.jsonl"
    with dataset.open("w") as f:
        for index, entry in enumerate(trace):
            row = {"payload": {"model": "tiny", **serve.http_body(
                workload.prompt(index), entry["output_tokens"], entry["priority"])}}
            if not args.concurrency:
                row["timestamp"] = round(entry["arrival_s"] * 1000)  # ms
            f.write(json.dumps(row) + "\n")
    load = (("--concurrency", str(args.concurrency), "--no-fixed-schedule")
            if args.concurrency else ("--fixed-schedule", "--fixed-schedule-auto-offset"))
    env, tokenizer = aiperf_env(work, Path(cluster.ready["model"]))
    artifacts = work / name
    command = aiperf_profile(
        url=cluster.base_url, model="tiny", tokenizer=tokenizer, artifact_dir=artifacts,
        args=("--endpoint-type", "completions", "--input-file", str(dataset),
              "--custom-dataset-type", "mooncake_trace", "--dataset-sampling-strategy",
              "sequential", "--request-count", str(len(trace)),
              # its scrapes of the gateway's /metrics would load the gateway, which
              # `ferry bench serve` does not do
              "--no-server-metrics", *load))
    run_aiperf(command, env, timeout_s=args.timeout)
    records = read_records(artifacts)
    ok = [r for r in records if not r.get("error")]
    return {
        "command": " ".join(["aiperf", *command[1:]]),
        "num_requests": len(ok), "num_failed": len(records) - len(ok),
        "ttft_ms": percentiles([r["metrics"]["time_to_first_token"]["value"] for r in ok]),
        "itl_ms": percentiles([r["metrics"]["inter_token_latency"]["value"] for r in ok
                               if "inter_token_latency" in r["metrics"]]),
    }


def ferry_run(args: argparse.Namespace, cluster, trace_path: Path) -> dict:
    """`ferry bench serve --http` on the same trace (its replay, the records kept); TTFT and
    ITL p50/p99 in ms."""
    from ferry.bench import serve

    kept = asyncio.run(serve.replay(argparse.Namespace(
        trace=str(trace_path), http=cluster.base_url + "/v1", vocab_size=args.vocab_size,
        time_scale=1.0, concurrency=args.concurrency, max_output_tokens=0,
        max_prompt_tokens=0, timeout=args.timeout, seed=args.seed, no_progress=True)))
    done = [r for r in kept if r.error is None and r.finish_s is not None]
    return {
        "command": (f"ferry bench serve --trace trace.jsonl --http URL/v1 "
                    f"--concurrency {args.concurrency} --seed {args.seed}"),
        "num_requests": len(done), "num_failed": len(kept) - len(done),
        "ttft_ms": percentiles([r.prefill_latency_s * 1e3 for r in done]),
        "itl_ms": percentiles([r.decode_latency_s * 1e3 for r in done
                               if r.num_output_tokens > 1]),
    }


# The columns: (label, path into a run's dict); "client - gateway" is the client's mean
# minus the gateway's over the same requests: what the client adds to what it measures.
COLUMNS = (("TTFT p50", ("ttft_ms", "p50")), ("TTFT p99", ("ttft_ms", "p99")),
           ("ITL p50", ("itl_ms", "p50")), ("ITL p99", ("itl_ms", "p99")),
           ("TTFT mean", ("ttft_ms", "mean")), ("gw TTFT", ("gateway", "ttft_ms_mean")),
           ("ITL mean", ("itl_ms", "mean")), ("gw ITL", ("gateway", "itl_ms_mean")))


def _value(run: dict, path: tuple[str, str]) -> float | None:
    return run.get(path[0], {}).get(path[1])


def medians(runs: list[dict]) -> dict[str, dict]:
    """Per client, the median over its rounds of each column, and the rounds' range."""
    out: dict[str, dict] = {}
    for client in dict.fromkeys(r["client"] for r in runs):
        mine = [r for r in runs if r["client"] == client]
        row: dict = {"num_requests": sum(r["num_requests"] for r in mine),
                     "num_failed": sum(r["num_failed"] for r in mine), "rounds": len(mine),
                     "range": {}}
        for label, path in COLUMNS:
            values = [v for r in mine if (v := _value(r, path)) is not None]
            row.setdefault(path[0], {})[path[1]] = float(np.median(values)) if values else None
            row["range"][label] = [min(values), max(values)] if values else None
        out[client] = row
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    def ms(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    head = "".join(f"{label:>10}" for label, _ in COLUMNS)
    lines = [f"{'client':<22} {'ok':>4} {'fail':>4}{head}{'TTFT -gw':>10}{'ITL -gw':>9}  (ms)"]
    for name, r in rows:
        values = [_value(r, path) for _, path in COLUMNS]
        ttft_gap = (values[4] - values[5]) if None not in (values[4], values[5]) else None
        itl_gap = (values[6] - values[7]) if None not in (values[6], values[7]) else None
        lines.append(f"{name:<22} {r['num_requests']:>4} {r['num_failed']:>4}"
                     + "".join(f"{ms(v):>10}" for v in values)
                     + f"{ms(ttft_gap):>10}{ms(itl_gap):>9}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executor", choices=("sim", "model"), default="sim",
                        help="sim: the tiny-cpu latency profile; model: the tiny model on CPU")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="closed loop, N in flight; 0: the trace's arrival times (--rate)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s of the trace's Poisson arrivals (with --concurrency 0)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="each client this many times, alternating (aiperf first)")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument("--work-dir", default="",
                        help="keep the trace, aiperf's artifacts and the logs here "
                             "(default: a temporary directory, removed)")


def run(args: argparse.Namespace) -> dict:
    if not AIPERF.exists():
        raise SystemExit(f"{AIPERF} is missing: run `make interop` first")
    if not args.concurrency and not args.rate > 0:
        raise SystemExit("--concurrency 0 replays arrival times: give --rate")
    trace = make_trace(args)
    with tempfile.TemporaryDirectory(prefix="ferry-interop-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        trace_path = work / "trace.jsonl"
        trace_path.write_text("".join(json.dumps(e) + "\n" for e in trace))
        extra: tuple[str, ...] = ("--worker-arg=--num-blocks=4096",)
        if args.executor == "sim":
            extra += ("--executor", "sim",
                      "--sim-profile", str(REPO / "services/worker/profiles/tiny-cpu.json"))
        cluster = start_cluster(work, workers=args.workers, extra=extra)
        runs: list[dict] = []
        try:
            # warm-up: the first requests of a fresh cluster pay one-time costs
            ferry_run(argparse.Namespace(**{**vars(args), "concurrency": 2}), cluster,
                      trace_path)
            for round_index in range(args.rounds):
                for client in ("aiperf", "ferry bench serve"):
                    before = gateway_sums(cluster.base_url)
                    result = (aiperf_run(args, cluster, trace, work, f"aiperf-{round_index}")
                              if client == "aiperf" else ferry_run(args, cluster, trace_path))
                    gateway = gateway_means(before, gateway_sums(cluster.base_url))
                    runs.append({"client": client, "round": round_index + 1, **result,
                                 "gateway": gateway})
        finally:
            cluster.stop()
    return {"args": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
            "mode": (f"closed loop, concurrency {args.concurrency}" if args.concurrency
                     else f"arrival times, {args.rate} req/s"),
            "runs": runs, "median_over_rounds": medians(runs),
            "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.bench.interop_check",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run(args)
    text = (f"{result['mode']}, {args.num_requests} requests of {args.prompt_tokens} prompt "
            f"+ {args.output_tokens} output tokens, {args.workers} workers "
            f"({args.executor} executor)\n"
            + table([(f"{r['client']} #{r['round']}", r) for r in result["runs"]])
            + f"\nmedian of {args.rounds} rounds\n"
            + table([(client, r) for client, r in result["median_over_rounds"].items()]))
    text += "\naiperf command (one round): " + result["runs"][0]["command"]
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
