"""`python -m services.gateway` / `ferry gateway`: flags for every GatewayConfig field,
defaults from common.env where it has one."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import uvloop

from common import env
from common import logging as ferry_logging
from common.config import Endpoint, GatewayConfig
from services.gateway.gateway import Gateway
from services.gateway.text import TextModel

DEFAULT_HTTP_PORT = 8000
DEFAULT_SDK_PORT = 8001
DEFAULT_INBOX_PORT = 5610


def build_parser() -> argparse.ArgumentParser:
    defaults = GatewayConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="ferry gateway", description="Ferry gateway: HTTP + SDK front door")
    p.add_argument("--gateway-id", default=f"gw-{socket.gethostname()}-{os.getpid()}",
                   help="unique per gateway; prefixes its request ids")
    p.add_argument("--http-host", default=env.bind_host(), help="HTTP bind interface")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    p.add_argument("--sdk-port", type=int, default=DEFAULT_SDK_PORT, help="ROUTER for the SDK")
    p.add_argument("--sdk-bind", help="override the SDK bind address (tcp://host:port)")
    p.add_argument("--sdk-advertise", help="override the SDK address peers dial")
    p.add_argument("--inbox-port", type=int, default=DEFAULT_INBOX_PORT,
                   help="PULL for tokens and scheduler messages")
    p.add_argument("--inbox-bind", help="override the inbox bind address")
    p.add_argument("--inbox-advertise", help="override the inbox address workers dial")
    p.add_argument("--scheduler-addr", default=env.scheduler_addr(), help="scheduler inbox")
    p.add_argument("--model", default=env.model(), help="model directory (tokenizer, config)")
    p.add_argument("--model-name", help="name served by /v1/models (default: directory name)")
    p.add_argument("--api-keys", default=",".join(env.api_keys()),
                   help="comma-separated keys; empty: no auth")
    for name, kind in (("max_inflight", int), ("max_queued_chunks", int),
                       ("default_timeout_s", float), ("max_tokens_limit", int),
                       ("bypass_after_s", float)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name].default)
    p.add_argument("--max-frame-bytes", type=int, default=env.max_frame_bytes())
    p.add_argument("--log-level", default=env.log_level())
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    def endpoint(port: int, bind: str | None, advertise: str | None) -> Endpoint:
        default = Endpoint.on_port(port)
        return Endpoint(bind=bind or default.bind, advertise=advertise or default.advertise)

    return GatewayConfig(
        gateway_id=args.gateway_id,
        http_host=args.http_host,
        http_port=args.http_port,
        sdk=endpoint(args.sdk_port, args.sdk_bind, args.sdk_advertise),
        inbox=endpoint(args.inbox_port, args.inbox_bind, args.inbox_advertise),
        scheduler_addr=args.scheduler_addr,
        model=args.model,
        model_name=args.model_name or Path(args.model).name,
        api_keys=tuple(k.strip() for k in args.api_keys.split(",") if k.strip()),
        max_inflight=args.max_inflight,
        max_queued_chunks=args.max_queued_chunks,
        default_timeout_s=args.default_timeout_s,
        max_tokens_limit=args.max_tokens_limit,
        bypass_after_s=args.bypass_after_s,
        max_frame_bytes=args.max_frame_bytes,
    )


async def serve(config: GatewayConfig, text: TextModel) -> None:
    """Run a gateway until SIGINT / SIGTERM."""
    task = asyncio.ensure_future(Gateway(config, text).run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ferry_logging.configure("gateway", level=args.log_level)
    config = config_from_args(args)
    try:
        text = TextModel.load(config.model)
    except (OSError, ValueError) as err:
        print(f"ferry gateway: cannot load the model's tokenizer: {err}", file=sys.stderr)
        return 2
    uvloop.run(serve(config, text))
    return 0
