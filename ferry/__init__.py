"""Ferry's client SDK (depends on `common` only)."""

from ferry.client import AsyncClient, AsyncStream, Chunk, Client, Completion, Stream
from ferry.errors import (
    BadRequest,
    FerryError,
    Overloaded,
    ServerError,
    Timeout,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "AsyncClient", "AsyncStream", "Chunk", "Client", "Completion", "Stream",
    "FerryError", "BadRequest", "Unauthorized", "Overloaded", "Unavailable", "Timeout",
    "ServerError",
]
