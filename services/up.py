"""`ferry up`: the whole local cluster in the foreground (DESIGN §8).

Starts the scheduler, the gateway and N workers as child processes, waits until the
gateway is healthy and every worker has registered, prints the endpoints, and on Ctrl-C
or SIGTERM stops every child (SIGINT: stop now, the whole cluster goes; then SIGKILL after
a grace period). Children also get SIGINT from the kernel if this process dies, so nothing
is left behind. (A worker given SIGTERM drains first: that is for stopping one of many.)
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from ferry.common import env
from ferry.services.scheduler.dispatch import POLICY_NAMES
from ferry.services.worker.model.resolve import RANDOM_PREFIX

STOP_GRACE_S = 8.0
READY_TIMEOUT_S = 300.0  # making the tiny model the first time takes a few seconds
PR_SET_PDEATHSIG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=env.model(), help="model directory or preset (tiny)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=env.device(), help="cpu | cuda | auto")
    parser.add_argument("--executor", default=env.executor(), choices=["model", "sim"])
    parser.add_argument("--sim-profile", default="", help="profile JSON for --executor sim "
                        "(default: the bundled CPU profile of tiny)")
    parser.add_argument("--sim-speedup", type=float, default=1.0)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--sdk-port", type=int, default=8001)
    parser.add_argument("--port-base", type=int, default=5600,
                        help="scheduler inbox (+0), admin (+1), gateway inbox (+2), "
                             "scheduler /metrics (+3), workers (+100 ...)")
    parser.add_argument("--policy", default="llumnix",
                        choices=POLICY_NAMES)
    parser.add_argument("--autoscale", action="store_true")
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=0, help="KV blocks per worker")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra argument for every worker (repeatable)")
    parser.add_argument("--scheduler-arg", action="append", default=[],
                        help="extra argument for the scheduler (repeatable)")
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for the gateway (repeatable)")
    parser.add_argument("--log-dir", default="", help="write each child's log here "
                        "(default: inherit this terminal's stderr)")


class Cluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: list[tuple[str, subprocess.Popen]] = []
        base = args.port_base
        self.scheduler_addr = f"tcp://127.0.0.1:{base}"
        self.admin_addr = f"tcp://127.0.0.1:{base + 1}"
        self.gateway_inbox_port = base + 2
        self.metrics_port = base + 3  # the scheduler's /metrics (HTTP)

    def worker_argv(self, instance_id: str, port: int, model_dir: str,
                    device: str | None = None) -> list[str]:
        a = self.args
        # "random:PRESET": workers draw the weights on the device (the gateway's model_dir
        # holds the preset's config and tokenizer only)
        worker_model = a.model if a.model.startswith(RANDOM_PREFIX) else model_dir
        argv = [sys.executable, "-m", "ferry.services.worker", "--instance-id", instance_id,
                "--port", str(port), "--scheduler-addr", self.scheduler_addr,
                "--model", worker_model, "--device", device or a.device,
                "--executor", a.executor,
                "--sim-speedup", str(a.sim_speedup)]
        if a.executor == "sim":
            argv += ["--sim-profile", a.sim_profile or default_sim_profile()]
        if a.num_blocks:
            argv += ["--num-blocks", str(a.num_blocks)]
        return argv + a.worker_arg

    def scheduler_argv(self, model_dir: str) -> list[str]:
        a = self.args
        base = a.port_base
        argv = [sys.executable, "-m", "ferry.services.scheduler", "--port", str(base),
                "--admin-port", str(base + 1), "--metrics-port", str(self.metrics_port),
                "--dispatch-policy", a.policy]
        if a.autoscale:
            template = " ".join(self.worker_argv("{instance_id}", 0, model_dir)[3:])
            template = template.replace("--port 0", "--port {port}")
            argv += ["--autoscale", "--min-workers", str(a.min_workers),
                     "--max-workers", str(a.max_workers), "--worker-args", template]
        return argv + a.scheduler_arg

    def gateway_argv(self, model_dir: str, *, http_port: int | None = None,
                     sdk_port: int | None = None, inbox_port: int | None = None) -> list[str]:
        """The gateway's command line; the ports default to this cluster's one gateway."""
        a = self.args
        return [
            sys.executable, "-m", "ferry.services.gateway",
            "--http-port", str(a.http_port if http_port is None else http_port),
            "--sdk-port", str(a.sdk_port if sdk_port is None else sdk_port),
            "--inbox-port", str(self.gateway_inbox_port if inbox_port is None else inbox_port),
            "--scheduler-addr", self.scheduler_addr, "--model", model_dir, *a.gateway_arg,
        ]

    def start(self, model_dir: str) -> None:
        a = self.args
        base = a.port_base
        self._spawn("scheduler", self.scheduler_argv(model_dir))
        self._spawn("gateway", self.gateway_argv(model_dir))
        if not a.autoscale:
            devices = worker_devices(a.device, a.workers) if a.executor == "model" else \
                [a.device] * a.workers
            for i in range(a.workers):
                self._spawn(f"worker-{i}", self.worker_argv(f"worker-{i}", base + 100 + i,
                                                            model_dir, devices[i]))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        stderr = None
        if self.args.log_dir:
            os.makedirs(self.args.log_dir, exist_ok=True)
            stderr = open(os.path.join(self.args.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        return proc

    def wait_ready(self, expected_workers: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.children:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start")
            if self._gateway_healthy() and self._live_workers() >= expected_workers:
                return
            time.sleep(0.3)
        raise RuntimeError(f"cluster not ready within {READY_TIMEOUT_S:.0f}s")

    def _gateway_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.args.http_port}/health",
                                        timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _live_workers(self) -> int:
        """Live instances as the scheduler sees them (0 while it is not answering)."""
        from ferry.common import wire
        from ferry.common.security import admin_keys
        from ferry.common.zmq_util import make_context, request

        try:
            reply = asyncio.run(request(make_context(), self.admin_addr, wire.StatusRequest(),
                                        timeout_s=1.0, expected=(wire.StatusReply,),
                                        keys=admin_keys()))
        except TimeoutError:
            return 0
        return sum(1 for inst in reply.instances if inst.alive)

    def stop(self) -> None:
        for _, proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def worker_devices(device: str, num_workers: int) -> list[str]:
    """One device per worker: "cuda"/"auto" with several GPUs spreads them round-robin
    (cuda:0, cuda:1, ...); anything explicit is used by every worker."""
    if device not in ("cuda", "auto"):
        return [device] * num_workers
    import torch

    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        return ["cpu" if device == "auto" else device] * num_workers
    return [f"cuda:{i % num_gpus}" for i in range(num_workers)]


def _die_with_parent() -> None:
    """In the child, before exec: SIGINT when the parent dies (Linux), own process group
    so a terminal's Ctrl-C reaches only `ferry up`, which then stops children in order."""
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    except OSError:
        pass


def default_sim_profile() -> str:
    """The bundled CPU profile of the tiny model (package data of ferry.services.worker.profiles)."""
    from importlib.resources import files

    return str(files("ferry.services.worker.profiles") / "tiny-cpu.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry up", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    stop = {"now": False}

    def on_signal(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    from ferry.services.worker.model.resolve import resolve_model

    model_dir = str(resolve_model(args.model))  # the gateway's tokenizer, even for sim
    cluster = Cluster(args)
    try:
        cluster.start(model_dir)
        cluster.wait_ready(args.min_workers if args.autoscale else args.workers)
        print(json.dumps({
            "ready": True,
            "http": f"http://127.0.0.1:{args.http_port}/v1",
            "sdk": f"tcp://127.0.0.1:{args.sdk_port}",
            "admin": cluster.admin_addr,
            # Prometheus: the gateway's (requests as clients see them) and the scheduler's
            # (instances, migrations, the pending queue)
            "metrics": {"gateway": f"http://127.0.0.1:{args.http_port}/metrics",
                        "scheduler": f"http://127.0.0.1:{cluster.metrics_port}/metrics"},
            "workers": args.workers if not args.autoscale else f"{args.min_workers}-"
                                                                   f"{args.max_workers}",
            "model": model_dir,
            "pids": {name: proc.pid for name, proc in cluster.children},
            # keyless on loopback is fine; say so (FERRY_KEYS_DIR turns CURVE on)
            "internal_sockets": "curve" if env.keys_dir() else "plain (loopback only)",
        }), flush=True)
        reported: set[str] = set()
        while not stop["now"]:
            # A worker or the scheduler may die: the cluster serves on (DESIGN §7).
            # Without the gateway nothing can be served, so that ends the run.
            for name, proc in cluster.children:
                if proc.poll() is not None and name not in reported:
                    reported.add(name)
                    print(f"ferry up: {name} exited with code {proc.returncode}", file=sys.stderr)
                    stop["now"] = stop["now"] or name == "gateway"
            time.sleep(0.2)
    except RuntimeError as err:
        print(f"ferry up: {err}", file=sys.stderr)
        cluster.stop()
        sys.exit(1)
    cluster.stop()


if __name__ == "__main__":
    main()
