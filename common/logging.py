"""structlog set-up shared by every process: one JSON object a line on stderr, with
`service`, and `req_id` / `instance_id` bound by callers where known."""

from __future__ import annotations

import logging
import sys

import structlog

from ferry.common import env


def configure(service: str, *, level: str | None = None, fmt: str | None = None) -> None:
    level_name = (level or env.log_level()).upper()
    numeric = getattr(logging, level_name, None)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level_name!r}")
    renderer = (
        structlog.dev.ConsoleRenderer(colors=False)
        if (fmt or env.log_format()) == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    """A lazy logger: it takes the configuration in force at its first use, so module-level
    loggers created at import still obey `configure()` called later."""
    return structlog.get_logger(**bound)
