"""Container health check for every Ferry service. Both images run it as their HEALTHCHECK
(`python /opt/ferry/healthcheck.py`), so one image carries the right check whatever
subcommand a container runs.

It reads the container's command from /proc/1/cmdline (`ferry gateway …`, behind
docker-init when the container runs with `init: true`), parses it with that service's own
flags (so the ports and ids it probes are the ones the process uses, environment defaults
included) and probes:

    gateway, up   GET http://<http host>:<http port>/health answers 200 (readiness: some
                  instance can serve; 503 before the workers register and after the last
                  one left)
    scheduler     its admin endpoint answers a status request
    worker        the scheduler lists this worker's instance id as alive: its model is
                  loaded and its load reports arrive

Any other command (generate, bench, …) is healthy while it runs. Exit 0: healthy, 1: not.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 3.0
# Hosts a service binds to listen on every interface; the probe dials loopback instead.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")
SERVICES = ("gateway", "scheduler", "worker", "up")


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    kind: str  # "http" | "admin" | "instance"
    target: str  # kind http: a URL; admin, instance: the scheduler's admin ZMQ address
    instance_id: str = ""  # kind instance: the worker that must be listed alive


def service_argv(cmdline: list[str]) -> list[str]:
    """`[subcommand, flags…]` from PID 1's argv: what follows its first `ferry` token
    (`/opt/ferry/.venv/bin/ferry gateway …`, `docker-init -- ferry worker …`); [] if none."""
    for i, arg in enumerate(cmdline):
        if Path(arg).name == "ferry":
            return cmdline[i + 1:]
    return []


def probe_for(argv: list[str]) -> Probe | None:
    """What to check for `ferry <argv>`; None: nothing. Flag defaults come from common.env,
    so this runs with the service's environment (the check inherits the container's)."""
    if not argv or argv[0] not in SERVICES:
        return None
    from ferry.common import env
    from ferry.services.cli import COMMANDS

    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(parser)
    # parse_known_args: a flag unknown here must not make a healthy service look sick.
    args, _ = parser.parse_known_args(argv[1:])

    def local(host: str) -> str:
        return "127.0.0.1" if host in WILDCARD_HOSTS else host

    if argv[0] in ("gateway", "up"):  # `ferry up` binds its gateway on FERRY_BIND_HOST
        host = args.http_host if argv[0] == "gateway" else env.bind_host()
        return Probe(kind="http", target=f"http://{local(host)}:{args.http_port}/health")
    if argv[0] == "scheduler":
        return Probe(kind="admin", target=f"tcp://{local(env.bind_host())}:{args.admin_port}")
    # The worker's instance id exactly as the worker derives it. config_from_args resolves
    # device "auto" by importing torch; the id does not depend on the device, so skip that.
    from ferry.services.worker.entry import config_from_args

    config = config_from_args(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    return Probe(kind="instance", target=env.scheduler_admin_addr(),
                 instance_id=config.instance_id)


def http_ok(url: str, timeout_s: float = TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:  # refused, timed out, or an HTTPError such as 503 (no instance view)
        return False


def ask_status(addr: str, timeout_s: float = TIMEOUT_S) -> object | None:
    """The scheduler's answer to a StatusRequest (a StatusReply, or an AdminError), or None
    when it does not answer in time."""
    from ferry.common import wire
    from ferry.common.security import admin_keys
    from ferry.common.zmq_util import make_context, request

    try:
        return asyncio.run(request(make_context(), addr, wire.StatusRequest(),
                                   timeout_s=timeout_s,
                                   expected=(wire.StatusReply, wire.AdminError),
                                   keys=admin_keys()))
    except TimeoutError:
        return None


def instance_alive(status: object | None, instance_id: str) -> bool:
    """Whether `status` (ask_status's answer) lists `instance_id` as alive."""
    from ferry.common import wire

    return isinstance(status, wire.StatusReply) and any(
        inst.instance_id == instance_id and inst.alive for inst in status.instances
    )


def check(probe: Probe | None) -> bool:
    if probe is None:
        return True
    if probe.kind == "http":
        return http_ok(probe.target)
    status = ask_status(probe.target)
    if probe.kind == "admin":
        return status is not None
    return instance_alive(status, probe.instance_id)


def main() -> int:
    cmdline = [a.decode() for a in Path("/proc/1/cmdline").read_bytes().split(b"\0") if a]
    probe = probe_for(service_argv(cmdline))
    if check(probe):
        return 0
    print(f"unhealthy: {probe}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
