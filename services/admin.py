"""`ferry status`, `ferry migrate` and `ferry drain`: the admin client of the scheduler."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from ferry.common import env, wire
from ferry.common.security import KeysError, check_role, load_keys
from ferry.common.zmq_util import make_context, request

# A freeness at or above this prints as "inf" (draining instances).
INF_FRACTION = 1e17


def _admin_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--admin-addr", default=env.scheduler_admin_addr(),
                        help="scheduler admin endpoint")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--keys-dir", default=env.keys_dir(),
                        help="cluster keys (default FERRY_KEYS_DIR); the admin identity speaks")
    parser.add_argument("--key-name", default=env.key_name() or "admin")
    return parser


def _ask(args: argparse.Namespace, msg: object, timeout_s: float,
         expected: tuple[type, ...]) -> object:
    try:
        keys = load_keys(args.keys_dir, args.key_name)
        if keys is not None:
            check_role(keys, "admin")
    except KeysError as err:
        print(f"ferry: {err}", file=sys.stderr)
        sys.exit(2)
    addr = args.admin_addr
    try:
        reply = asyncio.run(request(make_context(), addr, msg, timeout_s=timeout_s,
                                    expected=(*expected, wire.AdminError), keys=keys))
    except TimeoutError as err:
        print(f"ferry: {err} (is the scheduler running?)", file=sys.stderr)
        sys.exit(1)
    if isinstance(reply, wire.AdminError):
        print(f"ferry: scheduler error {reply.code}: {reply.message}", file=sys.stderr)
        sys.exit(1)
    return reply


def status_dict(reply: wire.StatusReply) -> dict:
    return {
        "scheduler_epoch": reply.scheduler_epoch,
        "dispatch_policy": reply.dispatch_policy,
        "instances": [
            {"instance_id": i.instance_id, "address": i.inbox_addr, "alive": i.alive,
             "draining": i.load.draining, "freeness": i.freeness,
             "last_report_age_s": i.last_report_age_s, **dataclasses.asdict(i.load)}
            for i in reply.instances
        ],
        "requests": [
            {"req_id": r.req_id, "instance_id": r.instance_id, "priority": r.priority}
            for r in reply.requests
        ],
        "num_pending": reply.num_pending,
        "migrations": {"committed": reply.num_migrations_committed,
                       "aborted": reply.num_migrations_aborted,
                       "abort_reasons": dict(reply.abort_reasons)},
        "prefix_pulls": {"sent": reply.num_pulls, "ok": reply.num_pulls_ok,
                         "failed": reply.num_pulls_failed, "blocks": reply.num_pull_blocks,
                         "fail_reasons": dict(reply.pull_fail_reasons)},
    }


def main_status(argv: list[str] | None = None) -> None:
    parser = _admin_parser("ferry status", "Instances, requests and migrations.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reply = _ask(args, wire.StatusRequest(), args.timeout, (wire.StatusReply,))
    data = status_dict(reply)
    if args.json:
        print(json.dumps(data, indent=1))
        return
    pulls = data["prefix_pulls"]
    print(f"policy {data['dispatch_policy']}   migrations committed "
          f"{data['migrations']['committed']}, aborted {data['migrations']['aborted']}   "
          f"prefix pulls {pulls['sent']} (ok {pulls['ok']}, failed {pulls['failed']}, "
          f"{pulls['blocks']} blocks)")
    print(f"{'instance':<22}{'alive':<7}{'drain':<7}{'free/total':>12}{'run':>6}{'wait':>6}"
          f"{'F':>10}{'step ms':>9}")
    for inst in data["instances"]:
        freeness = "inf" if inst["freeness"] >= INF_FRACTION else f"{inst['freeness']:.1f}"
        print(f"{inst['instance_id']:<22}{inst['alive']!s:<7}{inst['draining']!s:<7}"
              f"{inst['num_free_blocks']:>5}/{inst['num_total_blocks']:<6}"
              f"{inst['num_running']:>6}{inst['num_waiting']:>6}{freeness:>10}"
              f"{inst['step_time_ewma_s'] * 1e3:>9.2f}")
    print(f"{len(data['requests'])} requests in flight, {data['num_pending']} pending in the "
          "scheduler")
    for req in data["requests"]:
        print(f"  {req['req_id']:<30} on {req['instance_id']}")


def main_migrate(argv: list[str] | None = None) -> None:
    parser = _admin_parser("ferry migrate", "Migrate one running request now.")
    parser.add_argument("req_id")
    parser.add_argument("--to", required=True, dest="dst", help="destination instance id")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reply = _ask(args, wire.MigrateCommand(req_id=args.req_id, dst_instance_id=args.dst,
                                                      timeout_s=args.timeout),
                 args.timeout + 2.0, (wire.MigrateCommandReply,))
    details = dataclasses.asdict(reply.done) if reply.done else {}
    if args.json:
        print(json.dumps({"ok": reply.ok, "reason": reply.reason, **details}))
    elif reply.ok:
        print(f"migrated {args.req_id} to {args.dst}: {details.get('num_blocks', 0)} blocks in "
              f"{details.get('num_stages', 0)} stages, total {details.get('total_s', 0) * 1e3:.1f}"
              f" ms, downtime {details.get('downtime_s', 0) * 1e3:.2f} ms")
    if not reply.ok:
        print(f"ferry migrate: {reply.reason}", file=sys.stderr)
        sys.exit(1)


def main_drain(argv: list[str] | None = None) -> None:
    parser = _admin_parser("ferry drain", "Empty an instance: no new requests, and every "
                           "request it holds migrates to the others (zero-drop restarts).")
    parser.add_argument("instance_id")
    parser.add_argument("--cancel", action="store_true", help="take requests again")
    parser.set_defaults(timeout=120.0)
    args = parser.parse_args(argv)
    reply = _ask(args, wire.DrainCommand(instance_id=args.instance_id,
                                                   timeout_s=args.timeout, cancel=args.cancel),
                 args.timeout + 2.0, (wire.DrainReply,))
    if not reply.ok:
        print(f"ferry drain: {reply.reason} ({reply.num_left} requests left)", file=sys.stderr)
        sys.exit(1)
    print(f"{args.instance_id}: serving again" if args.cancel else
          f"{args.instance_id}: drained, holds no request (stop it now; SIGTERM drains too)")
