"""The `ferry` command (DESIGN §8). Each subcommand lives in its own module and is
imported only when used, so `ferry status` does not load torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# name -> (module, help). The module offers add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("ferry.services.up", "run a whole local cluster in the foreground"),
    "gateway": ("ferry.services.gateway.entry", "run the gateway alone"),
    "scheduler": ("ferry.services.scheduler.entry", "run the scheduler alone"),
    "worker": ("ferry.services.worker.entry", "run one worker alone"),
    "generate": ("ferry.services.generate", "offline generation in one process, JSON out"),
    "status": ("ferry.services.admin", "instances, requests and migrations of a cluster"),
    "migrate": ("ferry.services.admin", "migrate one request now"),
    "drain": ("ferry.services.admin", "move every request off an instance (zero-drop restart)"),
    "keys": ("ferry.services.keys", "make the CURVE keys of a cluster's internal sockets"),
    "make-model": ("ferry.services.worker.model.make_model", "write a random-weight model directory"),
    "profile": ("ferry.services.worker.profile", "measure engine step times and fit the sim latency model"),
    "bench": ("ferry.bench.cli", "traces, load driver, simulator, GPU benchmarks"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        _usage(argv[0] if argv and argv[0] not in ("-h", "--help") else None)
        return
    name, rest = argv[0], argv[1:]
    module = __import__(COMMANDS[name][0], fromlist=["main"])
    entry: Callable[[list[str]], object] = getattr(module, f"main_{name.replace('-', '_')}",
                                                   None) or module.main
    entry(rest)


def _usage(unknown: str | None) -> None:
    parser = argparse.ArgumentParser(prog="ferry", description="Ferry: LLM serving with live "
                                     "migration of running requests.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    parser.print_help(sys.stderr)
    if unknown is not None:
        print(f"\nferry: unknown command {unknown!r}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
