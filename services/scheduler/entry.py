"""`ferry scheduler …` / `python -m ferry.services.scheduler …`: flags for every SchedulerConfig
field (defaults from common.env where it has them, else SchedulerConfig's), and the
process entry point: the Scheduler loop on uvloop until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
from urllib.parse import urlparse

import uvloop

from ferry.common import env
from ferry.common import logging as ferry_logging
from ferry.common.config import Endpoint, SchedulerConfig, defaults
from ferry.common.logging import get_logger
from ferry.services.scheduler.dispatch import POLICY_NAMES
from ferry.services.scheduler.main import Scheduler
from ferry.services.scheduler.metrics import (
    DEFAULT_METRICS_PORT,
    MetricsServer,
    SchedulerCollector,
    make_registry,
)
from ferry.services.scheduler.provisioner import DEFAULT_WORKER_ARGS, LocalProcessProvisioner

log = get_logger()


def _port(addr: str) -> int:
    port = urlparse(addr).port
    if port is None:
        raise ValueError(f"no port in address {addr!r}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every SchedulerConfig field (`ferry scheduler …`); defaults from common.env
    where it has them, else SchedulerConfig's."""
    d = defaults(SchedulerConfig)
    add = parser.add_argument
    add(
        "--port",
        type=int,
        default=_port(env.scheduler_addr()),
        help="inbox (PULL) port; default from FERRY_SCHEDULER_ADDR; binds FERRY_BIND_HOST",
    )
    add(
        "--admin-port",
        type=int,
        default=_port(env.scheduler_admin_addr()),
        help="admin (ROUTER) port for ferry status / migrate; default from FERRY_SCHEDULER_ADMIN_ADDR",
    )
    add("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
        help="HTTP port of /metrics (Prometheus: per-instance load, migrations, the pending "
             "queue, autoscaling); 0: off")
    add("--metrics-host", default=env.bind_host(),
        help="interface /metrics binds; default FERRY_BIND_HOST")
    add("--dispatch-policy", choices=POLICY_NAMES, default=d["dispatch_policy"])
    add(
        "--heartbeat-timeout-s",
        type=float,
        default=d["heartbeat_timeout_s"],
        help="an instance silent this long is declared dead",
    )
    add(
        "--view-interval-s",
        type=float,
        default=d["view_interval_s"],
        help="how often gateways get the instance view",
    )
    add("--startup-grace-s", type=float, default=d["startup_grace_s"],
        help="no instance view this long after start (workers re-register meanwhile)")
    add("--gateway-timeout-s", type=float, default=d["gateway_timeout_s"],
        help="a gateway silent this long is gone: workers drop its requests")
    add("--enable-migration", action=argparse.BooleanOptionalAction, default=d["enable_migration"])
    add("--migration-interval-s", type=float, default=d["migration_interval_s"])
    add(
        "--migrate-out-threshold",
        type=float,
        default=d["migrate_out_threshold"],
        help="freeness below this makes an instance a migration source",
    )
    add(
        "--migrate-dst-growth-blocks",
        type=int,
        default=d["migrate_dst_growth_blocks"],
        help="blocks per running request a migration destination keeps free after a move",
    )
    add(
        "--migrate-margin",
        type=float,
        default=None,
        help="freeness a destination must exceed the source (and the threshold) by; "
        "default max(1, threshold)",
    )
    add("--max-migrations-per-instance", type=int, default=d["max_migrations_per_instance"])
    add(
        "--high-priority-headroom-blocks",
        type=int,
        default=d["high_priority_headroom_blocks"],
        help="virtual usage added per running high-priority request; > 0 also packs "
        "high-priority requests onto few instances that normal ones avoid (llumnix)",
    )
    add(
        "--max-queued-per-instance",
        type=int,
        default=d["max_queued_per_instance"],
        help="estimated queue length past which an instance takes no dispatch (all: 429)",
    )
    add("--autoscale", action=argparse.BooleanOptionalAction, default=d["autoscale"])
    add("--min-workers", type=int, default=d["min_workers"])
    add("--max-workers", type=int, default=d["max_workers"])
    add("--scale-up-freeness", type=float, default=d["scale_up_freeness"])
    add("--scale-down-freeness", type=float, default=d["scale_down_freeness"])
    add("--scale-cooldown-s", type=float, default=d["scale_cooldown_s"])
    add(
        "--worker-args",
        default=DEFAULT_WORKER_ARGS,
        help="arguments of `python -m ferry.services.worker` for autoscaled workers; "
        "{instance_id}, {port}, {scheduler_addr} are filled in",
    )
    add("--prefix-pull", action=argparse.BooleanOptionalAction, default=d["prefix_pull"],
        help="ferry: a free instance copies a busy one's cached prefix when the copy beats "
        "computing it")
    add("--kv-bandwidth-bytes-s", type=float, default=d["kv_bandwidth_bytes_s"],
        help="KV copy rate between instances the pull decision assumes, bytes/s (NVLink "
        "~200e9; gloo on CPU ~1e9)")
    add(
        "--hold-until-room",
        action=argparse.BooleanOptionalAction,
        default=d["hold_until_room"],
        help="hold a request no instance has room to start in one pending queue here, "
        "instead of queueing it at an instance",
    )
    add("--max-pending", type=int, default=d["max_pending"],
        help="held requests at most (past it: 429)")
    add("--pending-window", type=int, default=d["pending_window"],
        help="held requests a release scans for one that fits (first fit)")
    add("--pending-max-wait-s", type=float, default=d["pending_max_wait_s"],
        help="a request held this long is dispatched regardless of room")
    add("--max-frame-bytes", type=int, default=env.max_frame_bytes())
    add("--keys-dir", default=env.keys_dir(),
        help="cluster CURVE keys (ferry keys init); default FERRY_KEYS_DIR; empty: plain sockets")
    add("--key-name", default=env.key_name(),
        help="this process's identity in the keys directory (default: its role)")
    add("--log-level", default=env.log_level())
    add("--log-format", choices=("json", "console"), default=env.log_format())


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        inbox=Endpoint.on_port(args.port),
        admin=Endpoint.on_port(args.admin_port),
        dispatch_policy=args.dispatch_policy,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
        view_interval_s=args.view_interval_s,
        startup_grace_s=args.startup_grace_s,
        gateway_timeout_s=args.gateway_timeout_s,
        enable_migration=args.enable_migration,
        migration_interval_s=args.migration_interval_s,
        migrate_out_threshold=args.migrate_out_threshold,
        migrate_dst_growth_blocks=args.migrate_dst_growth_blocks,
        max_migrations_per_instance=args.max_migrations_per_instance,
        high_priority_headroom_blocks=args.high_priority_headroom_blocks,
        migrate_margin=args.migrate_margin,
        max_queued_per_instance=args.max_queued_per_instance,
        autoscale=args.autoscale,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        scale_up_freeness=args.scale_up_freeness,
        scale_down_freeness=args.scale_down_freeness,
        scale_cooldown_s=args.scale_cooldown_s,
        prefix_pull=args.prefix_pull,
        kv_bandwidth_bytes_s=args.kv_bandwidth_bytes_s,
        hold_until_room=args.hold_until_room,
        max_pending=args.max_pending,
        pending_window=args.pending_window,
        pending_max_wait_s=args.pending_max_wait_s,
        max_frame_bytes=args.max_frame_bytes,
        keys_dir=args.keys_dir,
        key_name=args.key_name,
    )


async def serve(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    provisioner = None
    if cfg.autoscale:
        provisioner = LocalProcessProvisioner(args.worker_args, scheduler_addr=cfg.inbox.advertise)
    scheduler = Scheduler(cfg, provisioner=provisioner)
    metrics = None
    if args.metrics_port:
        collector = SchedulerCollector(scheduler.core, scheduler.stats, scheduler)
        metrics = MetricsServer(make_registry(collector), args.metrics_host, args.metrics_port)
        try:
            await metrics.start()
        except OSError as err:
            scheduler.close()
            raise SystemExit(f"ferry scheduler: cannot serve /metrics on "
                             f"{args.metrics_host}:{args.metrics_port}: {err}") from None
        log.info("metrics_serving", url=f"http://{args.metrics_host}:{metrics.port}/metrics")
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await scheduler.run()
    except asyncio.CancelledError:
        log.info("scheduler_stopping")
    finally:
        scheduler.close()
        if metrics is not None:
            await metrics.stop()


def run(args: argparse.Namespace) -> int:
    ferry_logging.configure("scheduler", level=args.log_level, fmt=args.log_format)
    uvloop.run(serve(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ferry scheduler", description="Ferry's global scheduler."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
