"""`ferry bench migration`: live migration between two real worker processes, one per GPU.

This process plays scheduler and gateway: the workers register with it, report to it,
stream tokens to it and report each MigrationDone to it. For each sequence length it
dispatches a request R to the source, lets it decode, migrates it to the destination
(`--reps` times), and measures, in the same run:

- Ferry's pipelined migration: downtime (end of R's last step on the source to the end of
  its first step on the destination), total time, bytes, bulk-stage GB/s;
- stop-and-copy (the paper's "blocking copy" baseline): the same with max_stages=0;
- recompute (the paper's other baseline): time to re-prefill R's tokens on the
  destination (prompt of the same length, one output token);
- the decode step time of the other requests on the source (background requests kept
  decoding there) while migrations run, against the steady state between them.

    ferry bench migration --devices cuda:0,cuda:1 --out bench/results/migration_h200.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from ferry.common import wire
from ferry.common.sampling import SamplingParams

# How long each request keeps the source busy decoding (it is aborted after migrating).
DECODE_TOKENS = 4096
# Background requests decode this long: through the whole run, so none is replaced (a
# replacement's prefill would disturb the step times being measured).
BACKGROUND_TOKENS = 30_000


@dataclass
class Stream:
    """Arrival times of one request's Tokens messages at this driver."""

    sent_s: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, num tokens)
    finished: bool = False
    instance_id: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.arrivals)


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = zmq.asyncio.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        port = self.inbox.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self.push: dict[str, zmq.asyncio.Socket] = {}
        self.workers: dict[str, str] = {}  # instance id -> inbox
        self.streams: dict[str, Stream] = {}
        self.done: dict[str, wire.MigrationDone] = {}
        self.ids = itertools.count()
        self.rng = random.Random(0)
        self.procs: list[subprocess.Popen] = []

    # ---- plumbing ---------------------------------------------------------------------

    def send(self, addr: str, msg) -> None:
        sock = self.push.get(addr)
        if sock is None:
            sock = self.push[addr] = self.ctx.socket(zmq.PUSH)
            sock.connect(addr)
        sock.send_multipart(wire.encode(msg))

    async def receive(self) -> None:
        while True:
            msg = wire.decode(await self.inbox.recv_multipart())
            now = time.perf_counter()
            if isinstance(msg, wire.Register):
                self.workers[msg.instance_id] = msg.inbox_addr
            elif isinstance(msg, wire.Tokens):
                stream = self.streams.get(msg.req_id)
                if stream is not None:
                    stream.arrivals.append((now, len(msg.token_ids)))
                    stream.instance_id = msg.instance_id
                    stream.finished = msg.finish_reason is not None
            elif isinstance(msg, wire.MigrationDone):
                self.done[msg.migration_id] = msg
            elif isinstance(msg, wire.RequestError):
                print(f"request {msg.req_id} failed: {msg.message}", file=sys.stderr)
                if msg.req_id in self.streams:
                    self.streams[msg.req_id].finished = True

    def worker_names(self) -> list[tuple[str, str]]:
        """(instance id, device): the sources, then the destination (the last device)."""
        devices = self.args.devices.split(",")
        if len(devices) == 2:
            return [("src", devices[0]), ("dst", devices[1])]
        return [(f"src{i}", d) for i, d in enumerate(devices[:-1])] + [("dst", devices[-1])]

    def start_workers(self) -> None:
        a = self.args
        for name, device in self.worker_names():
            argv = [sys.executable, "-m", "ferry.services.worker", "--instance-id", name,
                    "--port", str(_free_port()), "--scheduler-addr", self.addr,
                    "--model", a.model, "--device", device, "--kv-cache-gb", str(a.kv_cache_gb),
                    "--max-num-batched-tokens", "8192", "--max-migrations", "4",
                    "--migration-timeout", "120", "--report-interval", "0.5"]
            if a.verify_kv:
                argv.append("--migration-verify-kv")
            log = open(Path(a.log_dir) / f"{name}.log", "wb") if a.log_dir else None  # noqa: SIM115
            self.procs.append(subprocess.Popen(argv, stderr=log, env={**os.environ}))

    def stop_workers(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def until(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.perf_counter() + timeout_s
        while not predicate():
            if time.perf_counter() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a worker exited; see --log-dir")
            await asyncio.sleep(0.002)

    # ---- requests ---------------------------------------------------------------------

    def dispatch(self, instance_id: str, prompt_len: int, max_tokens: int) -> str:
        req_id = f"bench-{next(self.ids)}"
        prompt = tuple(self.rng.randrange(16, 1000) for _ in range(prompt_len))  # any vocab
        self.streams[req_id] = Stream(sent_s=time.perf_counter())
        self.send(self.workers[instance_id], wire.Dispatch.of(wire.DispatchBody(
            req_id=req_id, attempt=0, prompt_token_ids=prompt, output_token_ids=(),
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    seed=0),
            arrival_s=time.time()), priority=0, reply_addr=self.addr))
        return req_id

    def keep_background(self) -> list[str]:
        """Keep args.background requests decoding on the source."""
        alive = [r for r in self.background if not self.streams[r].finished]
        while len(alive) < self.args.background:
            alive.append(self.dispatch("src", self.args.background_ctx, BACKGROUND_TOKENS))
        self.background = alive
        return alive

    async def migrate(self, req_id: str, *, max_stages: int, src: str = "src"
                      ) -> wire.MigrationDone:
        migration_id = f"m{next(self.ids)}"
        self.send(self.workers[src], wire.MigrateOut(
            migration_id=migration_id, dst_instance_id="dst",
            dst_inbox_addr=self.workers["dst"], req_id=req_id, max_stages=max_stages))
        await self.until(lambda: migration_id in self.done, 180, f"migration {migration_id}")
        return self.done[migration_id]

    # ---- the benchmark ----------------------------------------------------------------

    async def run_concurrent(self) -> dict:
        """Every source migrates one decoding request into the one destination at once;
        each must commit with its KV verified and keep streaming from there."""
        args = self.args
        names = [name for name, _ in self.worker_names()]
        sources = names[:-1]
        receiver = asyncio.create_task(self.receive())
        self.start_workers()
        try:
            await self.until(lambda: len(self.workers) == len(names), args.start_timeout,
                             "workers")
            rounds = []
            for length in [int(x) for x in args.lengths.split(",")]:
                req_ids = [self.dispatch(src, length, DECODE_TOKENS) for src in sources]
                await self.until(lambda ids=req_ids: all(self.streams[r].num_tokens >= 4
                                                         for r in ids),
                                 300, "the requests to decode")
                dones = await asyncio.gather(*[self.migrate(r, max_stages=-1, src=s)
                                               for r, s in zip(req_ids, sources, strict=True)])
                before = {r: self.streams[r].num_tokens for r in req_ids}
                await self.until(lambda ids=req_ids, seen=before: all(
                    self.streams[r].num_tokens >= seen[r] + 8 and self.streams[r].instance_id
                    == "dst" for r in ids), 120, "streams from dst")
                for r in req_ids:
                    self.send(self.workers["dst"], wire.Abort(req_id=r, reason="bench"))
                rounds.append({
                    "seq_len": length,
                    "committed": sum(d.committed for d in dones),
                    "kv_verified": sum(d.kv_verified for d in dones),
                    "downtime_ms": [round(d.downtime_s * 1e3, 3) for d in dones],
                    "total_ms": [round(d.total_s * 1e3, 1) for d in dones],
                    "reasons": [d.reason for d in dones if not d.committed],
                })
                print(json.dumps(rounds[-1]), flush=True)
                await asyncio.sleep(0.2)
        finally:
            receiver.cancel()
            self.stop_workers()
        return {"model": args.model, "devices": args.devices, "concurrent": len(sources),
                "rounds": rounds,
                "all_correct": all(r["committed"] == r["kv_verified"] == len(sources)
                                   for r in rounds)}

    async def run(self) -> dict:
        args = self.args
        receiver = asyncio.create_task(self.receive())
        self.start_workers()
        try:
            await self.until(lambda: len(self.workers) == 2, args.start_timeout, "workers")
            self.background: list[str] = []
            self.keep_background()
            await self.until(lambda: all(self.streams[r].num_tokens > 2 for r in self.background),
                             120, "background requests decoding")
            windows: list[tuple[float, float]] = []  # migration intervals
            steady: list[tuple[float, float]] = []  # R decoding, no migration (no prefill)
            rows = []
            for length in [int(x) for x in args.lengths.split(",")]:
                row = {"seq_len": length}
                for mode, max_stages in (("pipelined", -1), ("stop_and_copy", 0)):
                    dones = []
                    for _ in range(args.reps):
                        self.keep_background()
                        req_id = self.dispatch("src", length, DECODE_TOKENS)
                        await self.until(lambda r=req_id: self.streams[r].num_tokens >= 2, 300,
                                         "the request to decode")
                        decoding_since = time.perf_counter()
                        await self.until(lambda r=req_id: self.streams[r].num_tokens >= 12, 300,
                                         "the request to decode")
                        start = time.perf_counter()
                        steady.append((decoding_since, start))
                        done = await self.migrate(req_id, max_stages=max_stages)
                        windows.append((start, time.perf_counter()))
                        holder = "dst" if done.committed else "src"
                        self.send(self.workers[holder], wire.Abort(req_id=req_id, reason="bench"))
                        if not done.committed:
                            print(f"migration aborted: {done.reason}", file=sys.stderr)
                            continue
                        dones.append(done)
                        await asyncio.sleep(0.05)
                    row[mode] = _summary(dones)
                row["recompute"] = await self.recompute(length)
                rows.append(row)
                print(json.dumps(row), flush=True)
            steps = self.step_gaps(windows, steady)
        finally:
            receiver.cancel()
            self.stop_workers()
        return {"model": args.model, "devices": args.devices, "reps": args.reps,
                "background": args.background, "rows": rows, "source_decode": steps}

    async def recompute(self, length: int) -> dict:
        times = []
        for _ in range(max(3, self.args.reps // 3)):
            req_id = self.dispatch("dst", length, 1)
            await self.until(lambda r=req_id: self.streams[r].finished, 300, "recompute prefill")
            stream = self.streams[req_id]
            times.append(stream.arrivals[0][0] - stream.sent_s)
        return {"downtime_ms_p50": statistics.median(times) * 1e3}

    def step_gaps(self, windows: list[tuple[float, float]],
                  steady: list[tuple[float, float]]) -> dict:
        """Inter-token gaps of the background requests on the source (one Tokens message
        per decode step) inside migration windows, against steady windows where the same
        batch decodes with no migration and no prefill."""
        inside, outside = [], []
        for req_id in set(self.streams):
            if not req_id.startswith("bench-") or self.streams[req_id].instance_id != "src":
                continue
            arrivals = self.streams[req_id].arrivals
            if len(arrivals) < 3 or arrivals[0][1] != 1:
                continue
            for (t0, _), (t1, _) in itertools.pairwise(arrivals[1:]):
                if any(a <= t0 and t1 <= b for a, b in windows):
                    inside.append(t1 - t0)
                elif any(a <= t0 and t1 <= b for a, b in steady):
                    outside.append(t1 - t0)
        mean_in = statistics.mean(inside) if inside else float("nan")
        mean_out = statistics.mean(outside) if outside else float("nan")
        return {"step_ms_during_migration": mean_in * 1e3, "step_ms_steady": mean_out * 1e3,
                "slowdown": mean_in / mean_out - 1 if inside and outside else float("nan"),
                "num_steps_during": len(inside), "num_steps_steady": len(outside)}


def _summary(dones: list[wire.MigrationDone]) -> dict:
    if not dones:
        return {}
    down = sorted(d.downtime_s for d in dones)
    p99 = down[min(len(down) - 1, round(0.99 * (len(down) - 1)))]
    bulk = [d.first_stage_bytes / d.first_stage_s for d in dones if d.first_stage_s > 0]
    return {
        "n": len(dones),
        "downtime_ms_p50": statistics.median(down) * 1e3,
        "downtime_ms_p99": p99 * 1e3,
        "token_gap_ms_p50": statistics.median(d.token_gap_s for d in dones) * 1e3,
        "total_ms_p50": statistics.median(d.total_s for d in dones) * 1e3,
        "bytes": int(statistics.median(d.num_bytes for d in dones)),
        "stages_p50": statistics.median(d.num_stages for d in dones),
        "bulk_gb_s": statistics.median(bulk) / 1e9 if bulk else float("nan"),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(result: dict) -> str:
    lines = [f"migration bench: {result['model']} on {result['devices']}, {result['reps']} reps, "
             f"{result['background']} requests decoding on the source",
             f"{'seq':>6} | {'ferry downtime p50/p99 ms':>26} {'gap ms':>7} {'total ms':>9} "
             f"{'MB':>6} {'bulk GB/s':>9} | {'stop&copy down ms':>17} | {'recompute ms':>12} | "
             f"{'x recompute':>11}"]
    for row in result["rows"]:
        p, s = row.get("pipelined", {}), row.get("stop_and_copy", {})
        rec = row["recompute"]["downtime_ms_p50"]
        if not p:
            lines.append(f"{row['seq_len']:>6} | (no committed migration)")
            continue
        lines.append(
            f"{row['seq_len']:>6} | {p['downtime_ms_p50']:>12.2f} / {p['downtime_ms_p99']:>9.2f}"
            f"{p['token_gap_ms_p50']:>8.2f}{p['total_ms_p50']:>10.1f} {p['bytes'] / 1e6:>6.0f} "
            f"{p['bulk_gb_s']:>9.1f} | "
            f"{s.get('downtime_ms_p50', float('nan')):>17.2f} | {rec:>12.1f} | "
            f"{rec / p['downtime_ms_p50']:>10.0f}x")
    downs = [r["pipelined"]["downtime_ms_p50"] for r in result["rows"] if r.get("pipelined")]
    if downs:
        lines.append(f"downtime max/min over lengths: {max(downs) / min(downs):.2f}")
    sd = result["source_decode"]
    lines.append("downtime: request paused (last step end on src -> first step start on dst); "
                 "gap: last token on src -> first token on dst (adds the dst step)")
    lines.append(f"source decode step: {sd['step_ms_steady']:.2f} ms steady, "
                 f"{sd['step_ms_during_migration']:.2f} ms during migrations "
                 f"({sd['slowdown']:+.1%}; {sd['num_steps_during']} vs {sd['num_steps_steady']} "
                 f"steps)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:llama3-8b")
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="source,destination")
    parser.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--background", type=int, default=8,
                        help="requests kept decoding on the source")
    parser.add_argument("--background-ctx", type=int, default=1024)
    parser.add_argument("--kv-cache-gb", type=float, default=40.0)
    parser.add_argument("--concurrent", action="store_true",
                        help="all devices but the last migrate into the last at once")
    parser.add_argument("--verify-kv", action="store_true",
                        help="workers checksum each migrated KV at commit")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--log-dir", default="")
    parser.add_argument("--out", default="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry bench migration",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    driver = Driver(args)
    result = asyncio.run(driver.run_concurrent() if args.concurrent else driver.run())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.concurrent:
        print(f"{result['concurrent']} migrations at once into one destination: "
              f"all committed and KV-verified: {result['all_correct']}")
    else:
        print(format_table(result))


if __name__ == "__main__":
    main()
