"""Exceptions of the ferry SDK. Every error the gateway answers maps to one class by its
HTTP-like code (wire.ErrorReply.code)."""

from __future__ import annotations


class FerryError(Exception):
    """Base of every SDK error. `code` is the gateway's HTTP-like code (0: client-side)."""

    code = 0

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(FerryError):
    """The request is invalid (400) or too big (413)."""

    code = 400


class Unauthorized(FerryError):
    """Missing or wrong api key (401)."""

    code = 401


class Overloaded(FerryError):
    """The gateway or the cluster is full; retry later (429)."""

    code = 429


class Unavailable(FerryError):
    """No instance can take the request (503)."""

    code = 503


class ConnectionLost(Unavailable):
    """The connection to the gateway broke (it died or restarted, or the network failed:
    seen within ~3 s by heartbeats) while the request was in flight; whether it ran is
    unknown. Retried like Unavailable when it had no output yet and retries are allowed."""

    code = 0


class Timeout(FerryError, TimeoutError):
    """The request's deadline passed (504 from the gateway, or the client's own timer).
    `partial` holds what arrived before, when anything did."""

    code = 504

    def __init__(self, message: str, *, code: int | None = None, partial: object = None) -> None:
        super().__init__(message, code=code)
        self.partial = partial


class ServerError(FerryError):
    """The gateway or an engine failed (500, or any code without a class of its own)."""

    code = 500


_BY_CODE: dict[int, type[FerryError]] = {
    400: BadRequest,
    413: BadRequest,
    401: Unauthorized,
    429: Overloaded,
    503: Unavailable,
    504: Timeout,
}


def error_from_reply(code: int, message: str) -> FerryError:
    return _BY_CODE.get(code, ServerError)(f"{message} ({code})", code=code)
