"""The cluster `ferry bench chaos` breaks: one scheduler, two gateways and N workers, each
its own process on free loopback ports, which the benchmark kills, stops and restarts one
at a time. services/up.py's Cluster builds the command lines and spawns (each process's
log goes to LOG_DIR/NAME.log, appended across restarts); this adds names, the second
gateway, and the lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ferry.bench.local_cluster import free_port_base
from ferry.services.up import Cluster, worker_devices

GATEWAYS = ("gateway-a", "gateway-b")
STATUS_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class GatewayPorts:
    http_port: int
    sdk_port: int
    inbox_port: int

    @property
    def sdk_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.sdk_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def inbox_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.inbox_port}"


def cluster_args(*, workers: int, executor: str, device: str, sim_speedup: float,
                 num_blocks: int, log_dir: str, worker_args: list[str],
                 scheduler_args: list[str], gateway_args: list[str]) -> argparse.Namespace:
    """`ferry up`'s arguments for this cluster, on ports nothing else uses: scheduler
    inbox +0, admin +1, metrics +3, gateway HTTP / SDK +10 ... +13, gateway inboxes +20, +21,
    workers +100."""
    from ferry.services.up import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = free_port_base(workers, extra_offsets=(10, 11, 12, 13, 20, 21))
    args = parser.parse_args([
        "--workers", str(workers), "--executor", executor, "--device", device,
        "--sim-speedup", str(sim_speedup), "--port-base", str(base), "--log-dir", log_dir,
        "--num-blocks", str(num_blocks),
        *(f"--worker-arg={a}" for a in worker_args),
        *(f"--scheduler-arg={a}" for a in scheduler_args),
        *(f"--gateway-arg={a}" for a in gateway_args),
    ])
    return args


class ChaosCluster(Cluster):
    def __init__(self, args: argparse.Namespace, model_dir: str) -> None:
        super().__init__(args)
        base = args.port_base
        self.model_dir = model_dir
        self.gateways = {name: GatewayPorts(base + 10 + 2 * i, base + 11 + 2 * i, base + 20 + i)
                         for i, name in enumerate(GATEWAYS)}
        self.worker_ids = [f"worker-{i}" for i in range(args.workers)]
        self.devices = (worker_devices(args.device, args.workers) if args.executor == "model"
                        else [args.device] * args.workers)
        self.procs: dict[str, subprocess.Popen] = {}  # name -> its current process

    @property
    def names(self) -> list[str]:
        return ["scheduler", *self.gateways, *self.worker_ids]

    def argv(self, name: str) -> list[str]:
        if name == "scheduler":
            return self.scheduler_argv(self.model_dir)
        if name in self.gateways:
            g = self.gateways[name]
            return self.gateway_argv(self.model_dir, http_port=g.http_port, sdk_port=g.sdk_port,
                                     inbox_port=g.inbox_port) + ["--gateway-id", name]
        i = self.worker_ids.index(name)
        return self.worker_argv(name, self.args.port_base + 100 + i, self.model_dir,
                                self.devices[i])

    def launch(self, name: str) -> subprocess.Popen:
        """Start `name` (again: the same id, ports and log file)."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        self.procs[name] = self._spawn(name, self.argv(name))
        return self.procs[name]

    def launch_all(self) -> None:
        for name in self.names:
            self.launch(name)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> None:
        """kill -9, and reap it."""
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait()

    def running(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def exited(self) -> dict[str, int]:
        """Processes that ended by themselves (not by a fault): name -> exit code."""
        return {name: proc.returncode for name, proc in self.procs.items()
                if proc.poll() is not None}

    # ---- what the cluster says ------------------------------------------------------------

    async def status(self) -> dict | None:
        """`ferry status --json`'s data (the same code path), None while no scheduler answers."""
        from ferry.common import wire
        from ferry.common.zmq_util import make_context, request
        from ferry.services.admin import status_dict

        try:
            reply = await request(make_context(), self.admin_addr, wire.StatusRequest(),
                                  timeout_s=STATUS_TIMEOUT_S, expected=(wire.StatusReply,))
        except TimeoutError:
            return None
        return status_dict(reply)

    async def live_workers(self) -> set[str]:
        status = await self.status()
        if status is None:
            return set()
        return {i["instance_id"] for i in status["instances"]
                if i["alive"] and not i["draining"]}

    async def wait_workers(self, instance_ids: list[str], timeout_s: float) -> float:
        """Until the scheduler shows each of instance_ids alive and serving; the seconds it
        took. TimeoutError past timeout_s."""
        start = time.monotonic()
        while not set(instance_ids) <= await self.live_workers():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{instance_ids} not all alive after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)
        return time.monotonic() - start

    async def wait_dead(self, instance_id: str, timeout_s: float) -> float:
        """Until the scheduler no longer shows instance_id alive."""
        start = time.monotonic()
        while instance_id in await self.live_workers():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{instance_id} still alive after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    async def gateway_healthy(self, name: str) -> bool:
        import aiohttp

        try:
            async with aiohttp.ClientSession() as session, session.get(
                    self.gateways[name].base_url + "/health",
                    timeout=aiohttp.ClientTimeout(total=1)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_gateway(self, name: str, timeout_s: float) -> float:
        start = time.monotonic()
        while not await self.gateway_healthy(name):
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{name} not healthy after {timeout_s:.0f} s")
            if not self.running(name):
                raise RuntimeError(f"{name} exited with code {self.procs[name].returncode}")
            await asyncio.sleep(0.2)
        return time.monotonic() - start

    async def wait_ready(self, timeout_s: float) -> float:  # type: ignore[override]
        start = time.monotonic()
        for name in self.names:
            if not self.running(name):
                raise RuntimeError(f"{name} exited with code {self.procs[name].returncode}")
        await self.wait_workers(self.worker_ids, timeout_s)
        for name in self.gateways:
            await self.wait_gateway(name, timeout_s)
        return time.monotonic() - start

    async def wait_idle(self, timeout_s: float) -> tuple[bool, dict | None]:
        """Until nothing is in flight: no request placed or pending, every live instance
        with all its blocks free and nothing running or queued. (idle?, last status)"""
        deadline = time.monotonic() + timeout_s
        status = None
        while True:
            status = await self.status() or status
            if status is not None and is_idle(status):
                return True, status
            if time.monotonic() > deadline:
                return False, status
            await asyncio.sleep(0.25)


def is_idle(status: dict) -> bool:
    return not status["requests"] and not status["num_pending"] and all(
        i["num_free_blocks"] == i["num_total_blocks"] and not i["num_reserved_blocks"]
        and not i["num_running"] and not i["num_waiting"]
        for i in status["instances"] if i["alive"])


def leaks(status: dict | None) -> dict:
    """What is still held with nothing in flight: blocks not free on each live instance,
    requests the scheduler still places, requests it still holds pending."""
    if status is None:
        return {"blocks": None, "by_instance": {}, "requests": None, "pending": None}
    by_instance = {i["instance_id"]: {
        "used_blocks": i["num_total_blocks"] - i["num_free_blocks"],
        "reserved_blocks": i["num_reserved_blocks"], "running": i["num_running"],
        "waiting": i["num_waiting"]} for i in status["instances"] if i["alive"]}
    return {
        "blocks": sum(v["used_blocks"] for v in by_instance.values()),
        "by_instance": {k: v for k, v in by_instance.items() if any(v.values())},
        "requests": len(status["requests"]),
        "pending": status["num_pending"],
    }
