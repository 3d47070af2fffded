"""A real local cluster for end-to-end tests and benchmarks: `ferry up` as a child
process (scheduler, gateway, workers as its children), on ports nothing else uses."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# How the cluster is launched: the CLI module with this interpreter (tests, benchmarks); a
# test of what users run passes the installed `ferry` console script instead.
CLI_MODULE = (sys.executable, "-m", "ferry.services.cli")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(num_workers: int, extra_offsets: tuple[int, ...] = ()) -> int:
    """A base port with base..base+3, base+100..base+100+num_workers and base + each of
    extra_offsets free."""
    for _ in range(200):
        base = random.randrange(20_000, 40_000)
        ports = [*range(base, base + 4), *range(base + 100, base + 100 + num_workers),
                 *(base + offset for offset in extra_offsets)]
        if all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range")


@dataclass
class Cluster:
    proc: subprocess.Popen
    ready: dict
    http_port: int
    sdk_addr: str
    admin_addr: str
    log_dir: Path
    env: dict[str, str]  # the environment it runs with (keys for the admin commands)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def scheduler_metrics_url(self) -> str:
        return self.ready["metrics"]["scheduler"]

    def status(self) -> dict:
        out = subprocess.run(
            [*CLI_MODULE, "status", "--json", "--admin-addr", self.admin_addr],
            capture_output=True, text=True, cwd=REPO, check=True, env=self.env)
        return json.loads(out.stdout)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI_MODULE, *args, "--admin-addr", self.admin_addr],
                              capture_output=True, text=True, cwd=REPO, check=check,
                              env=self.env)

    def wait_idle(self, timeout_s: float = 20.0) -> dict:
        """Until no request is in flight and every live instance's blocks are all free."""
        deadline = time.monotonic() + timeout_s
        status = self.status()
        while time.monotonic() < deadline:
            status = self.status()
            if not status["requests"] and all(
                    i["num_free_blocks"] == i["num_total_blocks"] and i["num_running"] == 0
                    and i["num_waiting"] == 0 for i in status["instances"] if i["alive"]):
                return status
            time.sleep(0.2)
        raise AssertionError(f"cluster not idle: {json.dumps(status)[:2000]}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def start_cluster(tmp_dir: Path, *, workers: int = 2, extra: tuple[str, ...] = (),
                  model_cache: str | None = None, timeout_s: float = 240.0,
                  launcher: tuple[str, ...] = CLI_MODULE, cwd: Path = REPO,
                  env: dict[str, str] | None = None) -> Cluster:
    base = free_port_base(workers)
    http_port, sdk_port = base + 10, base + 11
    log_dir = tmp_dir / "logs"
    env = {**os.environ, "FERRY_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1", **(env or {})}
    if model_cache:
        env["FERRY_MODEL_CACHE"] = model_cache
    proc = subprocess.Popen(
        [*launcher, "up", "--workers", str(workers), "--device", "cpu", "--port-base", str(base),
         "--http-port", str(http_port), "--sdk-port", str(sdk_port), "--log-dir", str(log_dir),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            break
        if proc.poll() is not None:
            raise RuntimeError(f"ferry up exited: {proc.stderr.read()}")
    ready = json.loads(line)
    return Cluster(proc=proc, ready=ready, http_port=http_port, sdk_addr=ready["sdk"],
                   admin_addr=ready["admin"], log_dir=log_dir, env=env)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
