"""`ferry gateway …` / `python -m ferry.services.gateway …`: flags for every GatewayConfig field
(defaults from common.env where it has them, else GatewayConfig's), and the process entry
point: the Gateway loop on uvloop until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
from pathlib import Path

import uvloop

from ferry.common import env
from ferry.common import logging as ferry_logging
from ferry.common.config import Endpoint, GatewayConfig
from ferry.common.text import TextModel
from ferry.services.gateway.main import Gateway

DEFAULT_HTTP_PORT = 8000  # DESIGN §8
DEFAULT_SDK_PORT = 8001
DEFAULT_INBOX_PORT = 5602  # `ferry up` puts it at the scheduler's port + 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = {f.name: f.default for f in dataclasses.fields(GatewayConfig)
         if f.default is not dataclasses.MISSING}
    p.add_argument("--gateway-id", default=f"gw-{socket.gethostname()}-{os.getpid()}",
                   help="unique per gateway; prefixes its request ids")
    p.add_argument("--http-host", default=env.bind_host(), help="HTTP bind interface")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="OpenAI API")
    p.add_argument("--sdk-port", type=int, default=DEFAULT_SDK_PORT, help="ROUTER for the SDK")
    p.add_argument("--sdk-bind", default="", help="SDK bind address (default tcp://BIND_HOST:PORT)")
    p.add_argument("--sdk-advertise", default="",
                   help="SDK address clients dial (default tcp://FERRY_HOST:PORT)")
    p.add_argument("--inbox-port", type=int, default=DEFAULT_INBOX_PORT,
                   help="PULL for tokens and scheduler messages")
    p.add_argument("--inbox-bind", default="", help="inbox bind address")
    p.add_argument("--inbox-advertise", default="", help="inbox address workers dial")
    p.add_argument("--scheduler-addr", default=env.scheduler_addr(), help="scheduler inbox")
    p.add_argument("--model", default=env.model(),
                   help="model directory or preset name (its tokenizer and config.json)")
    p.add_argument("--model-name", default="", help="name in /v1/models (default: the model's)")
    p.add_argument("--api-keys", default=",".join(env.api_keys()),
                   help="comma-separated keys; empty: no auth")
    p.add_argument("--max-inflight", type=int, default=d["max_inflight"],
                   help="requests in flight; beyond that 429")
    p.add_argument("--max-queued-chunks", type=int, default=d["max_queued_chunks"],
                   help="deltas buffered per request for a slow HTTP client")
    p.add_argument("--default-timeout-s", type=float, default=d["default_timeout_s"],
                   help="per-request deadline unless the request says")
    p.add_argument("--max-tokens-limit", type=int, default=d["max_tokens_limit"],
                   help="largest max_tokens accepted")
    p.add_argument("--bypass-after-s", type=float, default=d["bypass_after_s"],
                   help="scheduler silent this long: dispatch straight to workers")
    p.add_argument("--keys-dir", default=env.keys_dir(),
        help="cluster CURVE keys (ferry keys init); default FERRY_KEYS_DIR; empty: plain sockets")
    p.add_argument("--key-name", default=env.key_name(),
        help="this process's identity in the keys directory (default: its role)")
    p.add_argument("--max-frame-bytes", type=int, default=env.max_frame_bytes(),
                   help="largest message body (and HTTP body) accepted")
    p.add_argument("--tokenizer-threads", type=int, default=d["num_tokenizer_threads"],
                   help="threads that parse large bodies and tokenize long prompts")
    p.add_argument("--max-tokenizer-queue", type=int, default=d["max_tokenizer_queue"],
                   help="requests waiting for a tokenizer thread; beyond that 429")
    p.add_argument("--http-idle-timeout-s", type=float, default=d["http_idle_timeout_s"],
                   help="close an HTTP connection silent this long (idle keep-alive, "
                        "no request yet, stalled headers or body)")
    p.add_argument("--max-http-connections", type=int, default=d["max_http_connections"],
                   help="open HTTP connections; more are answered 429 and closed")
    p.add_argument("--log-level", default=env.log_level())


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    def endpoint(port: int, bind: str, advertise: str) -> Endpoint:
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
        keys_dir=args.keys_dir,
        key_name=args.key_name,
        num_tokenizer_threads=args.tokenizer_threads,
        max_tokenizer_queue=args.max_tokenizer_queue,
        http_idle_timeout_s=args.http_idle_timeout_s,
        max_http_connections=args.max_http_connections,
    )


def load_text(model: str) -> TextModel:
    """The tokenizer side of `model`: a directory, or a preset the worker package makes."""
    try:
        from ferry.services.worker.model.resolve import resolve_model
    except ImportError:  # a checkout without the worker package: directories only
        return TextModel.load(model)
    return TextModel.load(resolve_model(model))


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry gateway", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    ferry_logging.configure("gateway", level=args.log_level)
    config = config_from_args(args)
    try:
        text = load_text(config.model)
    except (OSError, ValueError) as err:
        raise SystemExit(f"ferry gateway: cannot load the model's tokenizer: {err}") from None
    uvloop.run(serve(config, text))
