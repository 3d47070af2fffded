"""`ferry keys`: make and list the CURVE keys of a cluster (common/security.py).

    ferry keys init DIR                      cluster pair + scheduler, gateway, worker, admin
    ferry keys init DIR --workers w0,w1      + one worker key per instance, bound to it
    ferry keys add DIR NAME --role ROLE [--instance ID]
    ferry keys list DIR

Give every Ferry process the directory (FERRY_KEYS_DIR) and, unless its identity is its
role, its name (FERRY_KEY_NAME). The SDK port and HTTP stay as they are (API keys).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ferry.common.security import CLUSTER, ROLES, KeysError, add_identity, identities, init_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="a new key directory")
    init.add_argument("dir")
    init.add_argument("--workers", default="",
                      help="comma-separated instance ids: a key of its own for each, which "
                           "may speak only for that instance (else one shared worker key)")
    init.add_argument("--if-missing", action="store_true",
                      help="do nothing if DIR has keys already (container start-up)")
    add = sub.add_parser("add", help="one more identity")
    add.add_argument("dir")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--instance", default="", help="a worker key that speaks for this "
                     "instance id only")
    listing = sub.add_parser("list", help="the identities of a key directory")
    listing.add_argument("dir")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry keys", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            if args.if_missing and (Path(args.dir) / f"{CLUSTER}.key").exists():
                print(f"{args.dir}: keys exist, left as they are")
                return
            made = [(role, role, "") for role in ROLES]
            made += [(i, "worker", i) for i in filter(None, args.workers.split(","))]
            init_keys(args.dir, made)
            print(f"{args.dir}: cluster key and {len(made)} identities "
                  f"({', '.join(n for n, _, _ in made)}); give it to every process "
                  f"as FERRY_KEYS_DIR (secret: keep it mode 0700)")
        elif args.command == "add":
            path = add_identity(args.dir, args.name, args.role, args.instance)
            print(f"{path} (and {path.name}_secret)")
        else:
            for sender in sorted(identities(args.dir).values(), key=lambda s: (s.role, s.name)):
                bound = f" (speaks for {sender.instance_id} only)" if sender.instance_id else ""
                print(f"{sender.name:<24}{sender.role}{bound}")
    except KeysError as err:
        print(f"ferry keys: {err}", file=sys.stderr)
        sys.exit(2)
