"""The engine's load snapshot as the wire's LoadFields (worker reports, simulator)."""

from __future__ import annotations

import dataclasses

from ferry.common import wire
from ferry.services.worker.engine.engine import EngineLoad


def load_fields(load: EngineLoad, *, num_migrations_in: int, num_migrations_out: int,
                draining: bool) -> wire.LoadFields:
    """EngineLoad's fields carry LoadFields' names; the rest is the worker's own state."""
    return wire.LoadFields(**dataclasses.asdict(load), num_migrations_in=num_migrations_in,
                           num_migrations_out=num_migrations_out, draining=draining)
