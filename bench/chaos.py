"""`ferry bench chaos`: does every stream survive every fault?

Starts its own cluster (bench/chaos_cluster.py: a scheduler, two gateways, N workers, each
a process on free loopback ports) and keeps a steady load of seeded streams on it (both
gateways; the SDK, and HTTP SSE through the openai client), checking every token received
(bench/chaos_load.py). Then, one phase each, under that load:

    baseline            no fault (the control row)
    kill_worker         kill -9 the busiest worker; start it again once declared dead
    sigstop             SIGSTOP the busiest worker for 3 s, then SIGCONT
    kill_scheduler      kill -9 the scheduler, start it again after 5 s
    kill_scheduler_45s  the same with 45 s down
    kill_gateway        kill -9 gateway-b, start it again after 2 s: its clients may fail
                        with a connection error (SDK: ConnectionLost) and nothing else;
                        gateway-a's must not notice
    drain               `ferry drain` the busiest worker, then `ferry drain --cancel`
    rolling_restart     each worker in turn: SIGTERM, wait for its exit, start it with the
                        same id, wait until `ferry status` shows it alive
    poison              malformed frames, wrong types, bad addresses, unknown tags on every
                        internal socket, from a socket of its own (bench/chaos_poison.py)
    big_prompt          a 10 MB prompt over HTTP

After each phase: every stream has ended, the cluster is idle, and every live instance
has all its KV blocks free (else they leaked). Per phase: streams started / completed /
failed (by error) / cut short, duplicate, missing and wrong tokens, the longest stall a
client saw (p50, p99 over streams, max), leaked blocks, wall time, and a verdict listing
every broken invariant. A markdown table on stdout and beside the JSON (`--out`).
Exit status 1 when any phase failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.bench import chaos_poison as poison
from ferry.bench.chaos_cluster import GATEWAYS, ChaosCluster, cluster_args, leaks
from ferry.bench.chaos_load import (
    HTTP_CONNECTION_ERRORS,
    Expected,
    Load,
    make_specs,
    record_dict,
    reference_tokens,
    sim_tokens,
    summarize,
)

PHASES = ("baseline", "kill_worker", "sigstop", "kill_scheduler", "kill_scheduler_45s",
          "kill_gateway", "drain", "rolling_restart", "poison", "big_prompt")
READY_TIMEOUT_S = 240.0  # the first start makes the tiny model
RESTART_TIMEOUT_S = 60.0
KILLED_GATEWAY = GATEWAYS[1]
BIG_PROMPT_BYTES = 10_000_000
PROSE = "the quick brown fox jumps over the lazy dog, hello world! "
# Log events counted per phase besides every warning and error.
NOTABLE_EVENTS = {"instance_registered", "scheduler_started", "scheduler_restarted",
                  "gateway_ready", "worker_ready", "reregister", "leaving", "draining",
                  "dispatch_duplicate_ignored", "request_failed", "gateway_gone",
                  "engine_built", "instance_left", "phantom_request_dropped",
                  "migration_aborted"}
CLI = (sys.executable, "-m", "ferry.services.cli")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosConfig:
    phases: tuple[str, ...] = PHASES
    workers: int = 4
    executor: str = "sim"  # sim | model
    model: str = "tiny"
    device: str = "cpu"
    sim_speedup: float = 0.25  # <1: slower than the profile, so streams last seconds
    num_blocks: int = 0  # per worker; 0: the worker's default
    rate_per_s: float = 6.0  # stream arrivals
    max_tokens: int = 200
    prompt_len: tuple[int, int] = (16, 48)
    temperature: float = 0.8
    http_fraction: float = 0.25
    pool: int = 0  # distinct (prompt, seed) specs; 0: 256 for sim, 24 for model
    warmup_s: float = 2.5  # load before the fault
    tail_s: float = 3.0  # load after the fault's last step
    baseline_s: float = 6.0
    scheduler_down_s: float = 5.0
    scheduler_down_long_s: float = 45.0
    sigstop_s: float = 3.0
    gateway_down_s: float = 2.0
    request_timeout_s: float = 180.0
    stream_wait_s: float = 90.0  # after the load stops, how long streams may take to end
    idle_timeout_s: float = 30.0
    seed: int = 0
    log_dir: str = ""  # default: a new temporary directory
    worker_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()
    all_records: bool = False  # every stream's record in the JSON (else: the ones not ok
    # and the 5 longest stalls)


@dataclass
class Run:
    """What a fault needs: the cluster, the config, the phase clock."""

    cfg: ChaosConfig
    cluster: ChaosCluster
    model_name: str
    load: Load | None = None
    notes: dict = field(default_factory=dict)

    def now(self) -> float:
        assert self.load is not None
        return round(self.load.now(), 3)


# ---- faults --------------------------------------------------------------------------------
# Each runs under load and writes what it did into `out` as it goes (times in seconds from
# the phase start); it leaves the cluster whole again (every process running, every worker
# serving).


async def busiest_worker(run: Run) -> tuple[str, int]:
    """The live worker holding the most requests (its id, how many)."""
    status = await run.cluster.status()
    held = Counter({w: 0 for w in run.cluster.worker_ids})
    if status is not None:
        held.update(r["instance_id"] for r in status["requests"]
                    if r["instance_id"] in held)
    return held.most_common(1)[0]


async def fault_baseline(run: Run, out: dict) -> None:
    await asyncio.sleep(max(0.0, run.cfg.baseline_s - run.cfg.warmup_s))


async def fault_kill_worker(run: Run, out: dict) -> None:
    target, out["held"] = await busiest_worker(run)
    run.cluster.kill(target)
    out.update(target=target, killed_at_s=run.now())
    out["declared_dead_after_s"] = round(await run.cluster.wait_dead(target, 30), 3)
    await asyncio.sleep(1.0)
    run.cluster.launch(target)
    out["restarted_at_s"] = run.now()
    out["alive_after_s"] = round(await run.cluster.wait_workers([target], RESTART_TIMEOUT_S), 3)


async def fault_sigstop(run: Run, out: dict) -> None:
    target, out["held"] = await busiest_worker(run)
    run.cluster.signal(target, signal.SIGSTOP)
    out.update(target=target, stopped_at_s=run.now())
    try:
        await asyncio.sleep(run.cfg.sigstop_s)
    finally:
        run.cluster.signal(target, signal.SIGCONT)
    out["continued_at_s"] = run.now()
    out["alive_after_s"] = round(await run.cluster.wait_workers([target], RESTART_TIMEOUT_S), 3)


async def _kill_scheduler(run: Run, out: dict, down_s: float) -> None:
    run.cluster.kill("scheduler")
    out.update(killed_at_s=run.now(), down_s=down_s)
    await asyncio.sleep(down_s)
    run.cluster.launch("scheduler")
    out["restarted_at_s"] = run.now()
    out["all_alive_after_s"] = round(await run.cluster.wait_workers(
        run.cluster.worker_ids, RESTART_TIMEOUT_S), 3)


async def fault_kill_scheduler(run: Run, out: dict) -> None:
    await _kill_scheduler(run, out, run.cfg.scheduler_down_s)


async def fault_kill_scheduler_45s(run: Run, out: dict) -> None:
    await _kill_scheduler(run, out, run.cfg.scheduler_down_long_s)


async def fault_kill_gateway(run: Run, out: dict) -> None:
    run.cluster.kill(KILLED_GATEWAY)
    out.update(target=KILLED_GATEWAY, killed_at_s=run.now())
    await asyncio.sleep(run.cfg.gateway_down_s)
    run.cluster.launch(KILLED_GATEWAY)
    out["restarted_at_s"] = run.now()
    await run.cluster.wait_gateway(KILLED_GATEWAY, RESTART_TIMEOUT_S)
    out["healthy_at_s"] = run.now()


async def cli(run: Run, *args: str, timeout_s: float = 120.0) -> dict:
    """A `ferry` admin command against this cluster: exit code, output, seconds."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, "--admin-addr", run.cluster.admin_addr,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    return {"argv": ["ferry", *args], "rc": proc.returncode,
            "out": (stdout.decode() + stderr.decode()).strip()[-500:],
            "took_s": round(time.monotonic() - start, 3)}


async def fault_drain(run: Run, out: dict) -> None:
    target, held = await busiest_worker(run)
    out.update(target=target, held=held, drain_at_s=run.now())
    out["drain"] = await cli(run, "drain", target, "--timeout", "60")
    out["cancel"] = await cli(run, "drain", target, "--cancel")
    out["serving_after_s"] = round(await run.cluster.wait_workers([target], RESTART_TIMEOUT_S), 3)


async def fault_rolling_restart(run: Run, out: dict) -> None:
    steps = out["steps"] = []
    for worker in run.cluster.worker_ids:
        status = await run.cluster.status()
        held = sum(r["instance_id"] == worker for r in status["requests"]) if status else None
        step = {"target": worker, "held": held, "sigterm_at_s": run.now()}
        steps.append(step)
        run.cluster.signal(worker, signal.SIGTERM)
        proc = run.cluster.procs[worker]
        step["exit_code"] = await asyncio.to_thread(proc.wait, RESTART_TIMEOUT_S)
        step["exited_after_s"] = round(run.now() - step["sigterm_at_s"], 3)
        run.cluster.launch(worker)
        step["alive_after_s"] = round(await run.cluster.wait_workers([worker],
                                                                     RESTART_TIMEOUT_S), 3)


async def fault_poison(run: Run, out: dict) -> None:
    status = await run.cluster.status()
    live = [r["req_id"] for r in status["requests"]] if status else []
    out["sent_at_s"] = run.now()
    # Built in the thread too: a few hundred MB of frames would stall this loop's streams.
    out["targets"] = await asyncio.to_thread(send_poison, run.cluster, live)
    out["done_at_s"] = run.now()


def send_poison(cluster: ChaosCluster, live_req_ids: list[str]) -> dict:
    pulls = {"scheduler": (cluster.scheduler_addr, poison.generic() + poison.scheduler_inbox())}
    for name, ports in cluster.gateways.items():
        pulls[name] = (ports.inbox_addr, poison.generic() + poison.gateway_inbox(live_req_ids))
    for i, worker in enumerate(cluster.worker_ids):
        addr = f"tcp://127.0.0.1:{cluster.args.port_base + 100 + i}"
        pulls[worker] = (addr, poison.generic() + poison.worker_inbox(worker))
    routers = {f"{name} sdk": (ports.sdk_addr, poison.router_cases())
               for name, ports in cluster.gateways.items()}
    routers["scheduler admin"] = (cluster.admin_addr, poison.router_cases())
    return poison.send_all(pulls, routers)


def big_prompt_body(model_name: str) -> bytes:
    """Built before the phase's load starts (10 MB of JSON takes the client's loop a while)."""
    text = PROSE * (BIG_PROMPT_BYTES // len(PROSE))
    return json.dumps({"model": model_name, "prompt": text, "max_tokens": 16,
                       "stream": True}).encode()


async def fault_big_prompt(run: Run, out: dict) -> None:
    import aiohttp

    body = run.notes.pop("big_prompt_body")
    url = run.cluster.gateways[GATEWAYS[0]].base_url + "/v1/completions"
    out.update(bytes=len(body), sent_at_s=run.now())
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        try:
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                answer = await resp.read()
                out["status"] = resp.status
                out["answer"] = answer[:300].decode(errors="replace")
        except aiohttp.ClientError as err:  # a server may answer 413 and close mid-upload
            out["status"] = None
            out["error"] = repr(err)
    out["answered_after_s"] = round(time.monotonic() - start, 3)


FAULTS: dict[str, Callable[[Run, dict], Awaitable[None]]] = {
    "baseline": fault_baseline,
    "kill_worker": fault_kill_worker,
    "sigstop": fault_sigstop,
    "kill_scheduler": fault_kill_scheduler,
    "kill_scheduler_45s": fault_kill_scheduler_45s,
    "kill_gateway": fault_kill_gateway,
    "drain": fault_drain,
    "rolling_restart": fault_rolling_restart,
    "poison": fault_poison,
    "big_prompt": fault_big_prompt,
}


# ---- one phase -------------------------------------------------------------------------------


async def run_phase(run: Run, name: str, index: int, expected: Expected, sdk: dict,
                    http: dict, logs: LogWindow) -> dict:
    cfg = run.cfg
    repaired = await repair(run.cluster)
    if name == "big_prompt":
        run.notes["big_prompt_body"] = big_prompt_body(run.model_name)
    before = await run.cluster.status()
    t0 = time.monotonic()
    load = run.load = Load(
        sdk=sdk, http=http, model_name=run.model_name, expected=expected,
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, rate_per_s=cfg.rate_per_s,
        http_fraction=cfg.http_fraction, rng=random.Random(cfg.seed * 1000 + index), t0=t0,
        request_timeout_s=cfg.request_timeout_s)
    arrivals = asyncio.create_task(load.arrivals())
    watcher = asyncio.create_task(load.watch_loop())
    fault: dict[str, Any] = {}
    problems: list[str] = []
    print(f"chaos: {name} ...", file=sys.stderr, flush=True)
    try:
        await asyncio.sleep(cfg.warmup_s)
        await FAULTS[name](run, fault)
    except Exception as err:  # noqa: BLE001 -- a fault that could not be carried out
        fault["error"] = repr(err)
        problems.append(f"the fault step failed: {err!r}")
    await asyncio.sleep(cfg.tail_s)
    load.stop()
    await arrivals
    load_s = load.now()
    num_hung = await load.wait(cfg.stream_wait_s)
    streams_s = load.now()
    await watcher
    idle, status = await run.cluster.wait_idle(cfg.idle_timeout_s)
    wall_s = load.now()
    summary = summarize(load.records, cfg.max_tokens)
    leaked = leaks(status)
    alive = sorted(i["instance_id"] for i in (status or {}).get("instances", []) if i["alive"])
    not_running = [n for n in run.cluster.names if not run.cluster.running(n)]
    events = logs.read()
    problems += check(name, cfg, summary, load, fault, leaked, idle, num_hung, alive,
                      not_running, run.cluster.worker_ids, events)
    migrations = {}
    if before is not None and status is not None:
        migrations = {k: status["migrations"][k] - before["migrations"][k]
                      for k in ("committed", "aborted")}
        if status["scheduler_epoch"] != before["scheduler_epoch"]:
            migrations = {"note": "scheduler restarted: counters started again",
                          **status["migrations"]}
    out = {
        "phase": name,
        "ok": not problems,
        "problems": problems,
        **summary,
        "hung": num_hung,
        "client_loop_lag_s": {"max": round(load.loop_lag_max_s, 3),
                              "at_s": round(load.loop_lag_at_s, 3)},
        "leaked_blocks": leaked["blocks"],
        "leaks": leaked,
        "idle": idle,
        "alive_instances": alive,
        "not_running": not_running,
        "migrations": migrations,
        "repaired_before": repaired,
        "fault": fault,
        "load_s": round(load_s, 3),
        "streams_done_s": round(streams_s, 3),
        "idle_after_streams_s": round(wall_s - streams_s, 3),  # work left for nobody, if long
        "wall_s": round(wall_s, 3),
        "log_events": events,
    }
    kept = load.records if cfg.all_records else sorted(
        {id(r): r for r in [*(r for r in load.records if not r.ok(cfg.max_tokens)),
                            *sorted(load.records, key=lambda r: -r.max_gap_s)[:5]]}.values(),
        key=lambda r: r.num)
    out["streams"] = [record_dict(r) for r in kept]
    print(f"chaos: {name}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}",
          file=sys.stderr, flush=True)
    return out


async def repair(cluster: ChaosCluster) -> list[str]:
    """Start again whatever an earlier phase left down (that phase has failed already), so
    each phase starts from a whole cluster; what had to be started."""
    down = [name for name in cluster.names if not cluster.running(name)]
    for name in down:
        cluster.launch(name)
    if down:
        try:
            await cluster.wait_ready(RESTART_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as err:
            print(f"chaos: the cluster did not come back whole: {err}", file=sys.stderr)
    return down


def allowed_failure(name: str, rec: Any, fault: dict) -> bool:
    """kill_gateway: a stream of the killed gateway sent before it was healthy again may end
    with a connection error (SDK: ConnectionLost), raised after the kill. Nothing else may
    fail, anywhere."""
    if name != "kill_gateway" or rec.gateway != KILLED_GATEWAY or "killed_at_s" not in fault:
        return False
    healthy = fault.get("healthy_at_s", float("inf"))
    kinds = ("ConnectionLost",) if rec.protocol == "sdk" else HTTP_CONNECTION_ERRORS
    return rec.error in kinds and rec.sent_s <= healthy and rec.error_s >= fault["killed_at_s"]


def check(name: str, cfg: ChaosConfig, summary: dict, load: Load, fault: dict, leaked: dict,
          idle: bool, num_hung: int, alive: list[str], not_running: list[str],
          worker_ids: list[str], events: dict) -> list[str]:
    """Every invariant the phase broke, in words."""
    problems = []
    errors = {proc: bad for proc, v in events.items()
              if (bad := {e: n for e, n in v["events"].items()
                          if e.split(":")[0] in ("error", "critical")})}
    if errors:
        problems.append(f"errors logged: {errors}")
    failed = [r for r in load.records if r.error is not None]
    unexpected = Counter(f"{r.gateway}/{r.protocol}: {r.error}" for r in failed
                         if not allowed_failure(name, r, fault))
    if unexpected:
        problems.append(f"streams failed: {dict(unexpected)}")
    if name == "kill_gateway":
        allowed = [r for r in failed if allowed_failure(name, r, fault)]
        fault["failed_streams"] = len(allowed)
        in_flight = [r for r in allowed if r.sent_s < fault.get("killed_at_s", 0)]
        fault["error_after_kill_s"] = {
            "max": round(max((r.error_s - fault["killed_at_s"] for r in in_flight),
                             default=0.0), 3)}
        other = summary["by_gateway"].get(GATEWAYS[0], {})
        if other.get("completed") != other.get("started"):
            problems.append(f"{GATEWAYS[0]}'s clients noticed: {other}")
    for key, what in (("untyped_errors", "untyped errors"), ("cut_short", "streams cut short"),
                      ("duplicate_tokens", "duplicate tokens"),
                      ("missing_tokens", "missing tokens"), ("wrong_tokens", "wrong tokens"),
                      ("http_text_mismatch", "HTTP streams with the wrong text"),
                      ("sdk_text_mismatch", "SDK streams with the wrong text")):
        if summary[key]:
            problems.append(f"{summary[key]} {what}")
    if num_hung:
        problems.append(f"{num_hung} streams hung past {cfg.stream_wait_s:.0f} s")
    if not summary["started"]:
        problems.append("no stream started")
    if not idle:
        problems.append(f"not idle after {cfg.idle_timeout_s:.0f} s: {leaked}")
    elif leaked["blocks"]:
        problems.append(f"{leaked['blocks']} KV blocks leaked: {leaked['by_instance']}")
    missing = sorted(set(worker_ids) - set(alive))
    if missing:
        problems.append(f"workers not alive at the end: {missing}")
    if not_running:
        problems.append(f"processes not running at the end: {not_running}")
    if name == "big_prompt" and "status" in fault and not (
            fault["status"] in (400, 413) and fault["answered_after_s"] < 5.0):
        problems.append(f"10 MB prompt answered {fault['status']} after "
                        f"{fault['answered_after_s']} s (want 400/413 within 5 s)")
    if name == "drain":
        for step in ("drain", "cancel"):
            if step in fault and fault[step]["rc"] != 0:
                problems.append(f"ferry {' '.join(fault[step]['argv'][1:])}: "
                                f"{fault[step]['out']}")
    if name == "poison" and "targets" in fault:
        problems += check_poison(fault, events)
    if name == "rolling_restart":
        bad = [s for s in fault.get("steps", []) if s["exit_code"] != 0]
        if bad:
            problems.append(f"workers exited non-zero after SIGTERM: {bad}")
    return problems


def check_poison(fault: dict, events: dict) -> list[str]:
    """Each process refused (and logged) every malformed message sent to it, and each
    ROUTER answered every case with an error."""
    problems = []
    for target, out in fault["targets"].items():
        if "must_refuse" in out:
            logged = events.get(target, {}).get("events", {}).get("warning:rejected_message", 0)
            out["refused_logged"] = logged
            if logged != out["must_refuse"]:
                problems.append(f"{target} refused {logged} of the {out['must_refuse']} "
                                f"malformed messages sent to it")
        elif out["not_refused"]:
            problems.append(f"{target} did not refuse: {out['not_refused']}")
    return problems


# ---- logs -------------------------------------------------------------------------------------


class LogWindow:
    """Each process's log (LOG_DIR/NAME.log, JSON lines) read phase by phase: counts of
    warnings, errors and notable events per process, and the first error lines."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.offsets: dict[Path, int] = {}

    def read(self) -> dict:
        out: dict[str, Any] = {}
        for path in sorted(self.log_dir.glob("*.log")):
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            self.offsets[path] = self.offsets.get(path, 0) + len(data)
            counts: Counter = Counter()
            samples: list[str] = []
            for raw in data.decode(errors="replace").splitlines():
                try:
                    line = json.loads(raw)
                    event, level = line.get("event", "?"), line.get("level", "info")
                except (json.JSONDecodeError, AttributeError):
                    event, level, line = "(not json)", "error", raw
                if level in ("warning", "error", "critical") or event in NOTABLE_EVENTS:
                    counts[f"{level}:{event}"] += 1
                if level in ("error", "critical") and len(samples) < 5:
                    samples.append(str(line)[:1000])
            if counts:
                out[path.stem] = {"events": dict(counts.most_common())}
                if samples:
                    out[path.stem]["error_lines"] = samples
        return out


# ---- the run --------------------------------------------------------------------------------


async def run_chaos(cfg: ChaosConfig) -> dict:
    """Start the cluster, run the reference pass and every phase of cfg, stop; the result."""
    from openai import AsyncOpenAI

    from ferry import AsyncClient
    from ferry.common.text import TextModel
    from ferry.services.worker.model.resolve import resolve_model

    unknown = set(cfg.phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    model_dir = str(resolve_model(cfg.model))
    log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="ferry-chaos-"))
    args = cluster_args(workers=cfg.workers, executor=cfg.executor, device=cfg.device,
                        sim_speedup=cfg.sim_speedup, num_blocks=cfg.num_blocks,
                        log_dir=str(log_dir), worker_args=list(cfg.worker_args),
                        scheduler_args=list(cfg.scheduler_args),
                        gateway_args=list(cfg.gateway_args))
    cluster = ChaosCluster(args, model_dir)
    result: dict[str, Any] = {"config": _config_dict(cfg), "log_dir": str(log_dir),
                              "ports": {"base": args.port_base}, "phases": []}
    print(f"chaos: logs in {log_dir}", file=sys.stderr, flush=True)
    start = time.monotonic()
    cluster.launch_all()
    sdk: dict[str, AsyncClient] = {}
    http: dict[str, AsyncOpenAI] = {}
    try:
        result["ready_after_s"] = round(await cluster.wait_ready(READY_TIMEOUT_S), 3)
        text = TextModel.load(model_dir)
        model_name = Path(model_dir).name
        pool = cfg.pool or (256 if cfg.executor == "sim" else 24)
        specs = make_specs(pool, seed=cfg.seed, vocab_size=text.vocab_size,
                           prompt_len=cfg.prompt_len)
        for name, ports in cluster.gateways.items():
            sdk[name] = AsyncClient(ports.sdk_addr, timeout_s=cfg.request_timeout_s)
            http[name] = AsyncOpenAI(base_url=ports.base_url + "/v1", api_key="unused",
                                     max_retries=0, timeout=cfg.request_timeout_s)
        expected, result["reference"] = await reference(cfg, cluster, specs, text,
                                                        sdk[GATEWAYS[0]])
        run = Run(cfg=cfg, cluster=cluster, model_name=model_name)
        logs = LogWindow(log_dir)
        logs.read()  # start-up
        for index, name in enumerate(cfg.phases):
            result["phases"].append(await run_phase(run, name, index, expected, sdk, http,
                                                    logs))
    finally:
        for client in sdk.values():
            await client.close()
        for client in http.values():
            await client.close()
        await asyncio.to_thread(cluster.stop)
    result["wall_s"] = round(time.monotonic() - start, 3)
    result["ok"] = bool(result["phases"]) and all(p["ok"] for p in result["phases"])
    return result


async def reference(cfg: ChaosConfig, cluster: ChaosCluster, specs: list, text: Any,
                    client: Any) -> tuple[Expected, dict]:
    """The expected tokens of every spec. Sim: the formula (sim_tokens), checked here
    against an undisturbed run of the first 16 specs; model: an undisturbed run of all."""
    start = time.monotonic()
    if cfg.executor == "sim":
        from ferry.services.worker.entry import served_vocab_size
        from ferry.services.worker.sim_executor import SimExecutor

        sim = SimExecutor(None, num_blocks=1, block_size=16,
                          vocab_size=served_vocab_size(cluster.model_dir) or 32000)
        tokens = [sim_tokens(sim, spec, cfg.max_tokens) for spec in specs]
        got = await reference_tokens(client, specs[:16], cfg.max_tokens, cfg.temperature,
                                     cfg.request_timeout_s)
        mismatch = [i for i, out in enumerate(got) if out != tokens[i]]
        if mismatch:
            raise RuntimeError(f"the sim formula disagrees with the cluster on specs {mismatch}")
        info = {"kind": "sim formula, checked", "num_checked": len(got)}
    else:
        tokens = await reference_tokens(client, specs, cfg.max_tokens, cfg.temperature,
                                        cfg.request_timeout_s)
        info = {"kind": "undisturbed run", "num_specs": len(tokens)}
    idle, status = await cluster.wait_idle(cfg.idle_timeout_s)
    info["idle_after"] = idle
    info["wall_s"] = round(time.monotonic() - start, 3)
    return Expected(specs, tokens, text), info


def _config_dict(cfg: ChaosConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


# ---- report --------------------------------------------------------------------------------


def table(result: dict) -> str:
    rows = ["| phase | streams | completed | failed (error) | cut short | dup | missing | wrong "
            "| text ≠ | stall p50 / p99 / max (s) | leaked blocks | wall (s) | verdict |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for p in result["phases"]:
        failed = ", ".join(f"{n} {e}" for e, n in sorted(p["failed"].items())) or "0"
        stall = p["stall_s"]
        verdict = "ok" if p["ok"] else "**FAIL**: " + "; ".join(p["problems"])
        rows.append(
            f"| {p['phase']} | {p['started']} | {p['completed']} | {failed} | {p['cut_short']} "
            f"| {p['duplicate_tokens']} | {p['missing_tokens']} | {p['wrong_tokens']} "
            f"| {p['sdk_text_mismatch'] + p['http_text_mismatch']} | {stall['p50']:.2f} / {stall['p99']:.2f} / "
            f"{stall['max']:.2f} | {p['leaked_blocks']} | {p['wall_s']:.1f} | {verdict} |")
    return "\n".join(rows)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu,
            "num_cpus": os.cpu_count(), "python": platform.python_version(),
            "git_commit": commit, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def parse_args(argv: list[str] | None) -> tuple[ChaosConfig, argparse.Namespace]:
    d = ChaosConfig()
    p = argparse.ArgumentParser(prog="ferry bench chaos",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="phases: " + ", ".join(PHASES))
    p.add_argument("--phases", default="all", help="comma-separated, or all")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--executor", choices=["sim", "model"], default=d.executor)
    p.add_argument("--model", default=d.model, help="model directory or preset (tiny)")
    p.add_argument("--device", default=d.device, help="model workers: cpu | cuda | auto")
    p.add_argument("--sim-speedup", type=float, default=d.sim_speedup)
    p.add_argument("--num-blocks", type=int, default=d.num_blocks)
    p.add_argument("--rate", type=float, default=d.rate_per_s, help="streams started a second")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--http-fraction", type=float, default=d.http_fraction)
    p.add_argument("--pool", type=int, default=d.pool, help="distinct seeded requests")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s)
    p.add_argument("--tail-s", type=float, default=d.tail_s)
    p.add_argument("--baseline-s", type=float, default=d.baseline_s)
    p.add_argument("--scheduler-down-s", type=float, default=d.scheduler_down_s)
    p.add_argument("--scheduler-down-long-s", type=float, default=d.scheduler_down_long_s)
    p.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-dir", default="", help="each process's log (default: a temp dir)")
    p.add_argument("--worker-arg", action="append", default=[])
    p.add_argument("--scheduler-arg", action="append", default=[])
    p.add_argument("--gateway-arg", action="append", default=[])
    p.add_argument("--all-records", action="store_true",
                   help="every stream's record in the JSON (default: those not ok, and the "
                        "5 longest stalls of each phase)")
    p.add_argument("--out", default="bench/results/chaos/chaos.json",
                   help="JSON result; the table goes beside it (.md)")
    a = p.parse_args(argv)
    phases = PHASES if a.phases == "all" else tuple(x for x in a.phases.split(",") if x)
    unknown = [x for x in phases if x not in PHASES]
    if unknown:
        p.error(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    cfg = ChaosConfig(
        phases=phases, workers=a.workers, executor=a.executor, model=a.model, device=a.device,
        sim_speedup=a.sim_speedup, num_blocks=a.num_blocks, rate_per_s=a.rate,
        max_tokens=a.max_tokens, http_fraction=a.http_fraction, pool=a.pool,
        warmup_s=a.warmup_s, tail_s=a.tail_s, baseline_s=a.baseline_s,
        scheduler_down_s=a.scheduler_down_s, scheduler_down_long_s=a.scheduler_down_long_s,
        idle_timeout_s=a.idle_timeout_s, seed=a.seed, log_dir=a.log_dir,
        worker_args=tuple(a.worker_arg), scheduler_args=tuple(a.scheduler_arg),
        gateway_args=tuple(a.gateway_arg), all_records=a.all_records)
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    import uvloop

    result = uvloop.run(run_chaos(cfg))
    result = {"command": shlex.join(["ferry", "bench", "chaos", *argv]), "machine": machine(),
              **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    out.with_suffix(".md").write_text(
        f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['num_cpus']} "
        f"CPUs), {result['machine']['date_utc']}, commit {result['machine']['git_commit']}\n\n"
        f"{md}\n")
    print(md)
    print(f"\nJSON: {out}   logs: {result['log_dir']}   total {result['wall_s']:.0f} s")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
