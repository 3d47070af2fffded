"""The request state a migration carries: the engine's ExportedRequest on the wire as
RequestState (every field but the prompt, which travels earlier with MigPrealloc)."""

from __future__ import annotations

import dataclasses

from ferry.common import wire
from ferry.services.worker.engine.engine import ExportedRequest

_WIRE_FIELDS = tuple(f.name for f in dataclasses.fields(wire.RequestState))


def to_wire(state: ExportedRequest) -> wire.RequestState:
    return wire.RequestState(**{name: getattr(state, name) for name in _WIRE_FIELDS})


def from_wire(state: wire.RequestState, prompt_token_ids: tuple[int, ...]) -> ExportedRequest:
    return ExportedRequest(prompt_token_ids=prompt_token_ids,
                           **{name: getattr(state, name) for name in _WIRE_FIELDS})
