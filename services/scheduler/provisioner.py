"""Where new instances come from. The autoscaler's wiring needs two verbs:

    start_worker() -> WorkerHandle     start one instance (it registers by itself)
    stop_worker(instance_id) -> bool   stop one (drained to zero first)

`LocalProcessProvisioner` runs each worker as a local `python -m ferry.services.worker` process.
Its arguments come from a template in which `{instance_id}`, `{port}` (a free TCP port on
this host, for the worker's inbox) and `{scheduler_addr}` are filled in, e.g.

    --instance-id {instance_id} --port {port} --scheduler-addr {scheduler_addr} --model tiny
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.common.logging import get_logger

WORKER_COMMAND = (sys.executable, "-m", "ferry.services.worker")
DEFAULT_WORKER_ARGS = "--instance-id {instance_id} --port {port} --scheduler-addr {scheduler_addr}"
# After SIGINT, a worker gets this long to exit before SIGKILL.
STOP_GRACE_S = 10.0

log = get_logger()


@dataclass(frozen=True, slots=True)
class WorkerHandle:
    instance_id: str
    pid: int


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalProcessProvisioner:
    def __init__(
        self,
        args_template: str,
        *,
        scheduler_addr: str,
        instance_prefix: str = "auto",
        command: Sequence[str] = WORKER_COMMAND,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args_template = shlex.split(args_template)
        self.scheduler_addr = scheduler_addr
        self.instance_prefix = instance_prefix
        self.command = tuple(command)
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}  # running (or not yet reaped)
        self.stopping: dict[str, float] = {}  # instance_id -> SIGKILL deadline (monotonic)
        self._numbers = itertools.count()

    def argv(self, instance_id: str, port: int) -> list[str]:
        fill = {"instance_id": instance_id, "port": port, "scheduler_addr": self.scheduler_addr}
        return [*self.command, *(arg.format(**fill) for arg in self.args_template)]

    def start_worker(self) -> WorkerHandle:
        instance_id = f"{self.instance_prefix}-{os.getpid()}-{next(self._numbers)}"
        argv = self.argv(instance_id, free_port())
        proc = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.procs[instance_id] = proc
        log.info("worker_started", instance_id=instance_id, pid=proc.pid, argv=argv)
        return WorkerHandle(instance_id=instance_id, pid=proc.pid)

    def stop_worker(self, instance_id: str, *, now: float | None = None) -> bool:
        """SIGINT now (stop at once: the autoscaler drained it first; SIGTERM would make it
        drain again); `reap` sends SIGKILL if it is still there after STOP_GRACE_S. True:
        it is stopping, or was gone already."""
        proc = self.procs.get(instance_id)
        if proc is None:
            log.warning("stop_unknown_worker", instance_id=instance_id)
            return True
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        self.stopping[instance_id] = (now if now is not None else time.monotonic()) + STOP_GRACE_S
        log.info("worker_stopping", instance_id=instance_id, pid=proc.pid)
        return True

    def reap(self, now: float | None = None) -> list[str]:
        """Collect exited workers (stopped or crashed); kill those past their grace.
        Returns the ids that exited."""
        now = now if now is not None else time.monotonic()
        exited = []
        for instance_id, proc in list(self.procs.items()):
            if proc.poll() is not None:
                del self.procs[instance_id]
                self.stopping.pop(instance_id, None)
                exited.append(instance_id)
                log.info("worker_exited", instance_id=instance_id, returncode=proc.returncode)
            elif now > self.stopping.get(instance_id, float("inf")):
                proc.kill()
        return exited

    def close(self, timeout_s: float = STOP_GRACE_S) -> None:
        """Stop every worker this provisioner started and wait for them."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.stopping.clear()
