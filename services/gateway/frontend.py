"""What the gateway's front ends (http_api.py, sdk.py) and its process loop (main.py) agree
on: the calls a front end makes into the gateway (`GatewayApi`, which main.Gateway
provides) and where a request's output goes (`Sink`, which each front end provides).

Its own module so that the front ends never import main.py, which builds them:
tests/unit/test_import_cycles.py keeps the gateway's modules free of import cycles.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ferry.common.config import GatewayConfig
from ferry.common.sampling import SamplingParams
from ferry.common.text import TextModel
from ferry.services.gateway.metrics import GatewayMetrics
from ferry.services.gateway.requests import Delta, Request

T = TypeVar("T")


class Sink(Protocol):
    """Where one request's output goes (SdkSink, HttpSink)."""

    def push(self, delta: Delta) -> bool:
        """Hand over a delta; False when the client is gone (the gateway aborts)."""
        ...

    def fail(self, code: int, message: str) -> None:
        """End the request with an error (HTTP-like code)."""
        ...


class GatewayApi(Protocol):
    """The gateway as a front end sees it."""

    config: GatewayConfig
    text: TextModel
    metrics: GatewayMetrics

    def submit(self, prompt_token_ids: tuple[int, ...], sampling: SamplingParams, *,
               priority: int, timeout_s: float | None, stream: bool, sink: Sink) -> Request:
        """Admit and dispatch a request; raises Rejected (400, 429, 503)."""
        ...

    def tokenize_off_loop(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run fn (parse a body, tokenize a prompt) in the gateway's bounded pool."""
        ...

    def abort(self, req_id: str) -> None:
        """The client gave up: finish the request with "abort"."""
        ...

    def health(self) -> tuple[bool, str]:
        """(ready?, reason) for /health."""
        ...
