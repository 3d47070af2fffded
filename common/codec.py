"""The codec: frozen dataclasses <-> ZMQ frames, msgpack bodies, strict decoding.

Frames of one message:

    [header][fields]            most messages
    [header][fields][body]      a message registered with a body type (Dispatch)
    header = struct "!BH": protocol version (u8), message tag (u16)
    fields = msgpack array of the message's field values, in declaration order;
             a nested struct is itself an array; tuples travel as arrays. Trailing
             fields that have a default may be missing (an older sender): they take it.
    body   = the message's last field, `body: bytes`: a value of its body type, encoded
             (`encode_body`) as that type's msgpack array

Routers read the header (`peek_tag`), or the fields (`decode`), and forward the frames
unread: `decode` checks the body frame's size only; its recipient decodes it
(`decode_body`), as strictly as the rest. Decoding checks version, tag, size, arity and
every field's type against the dataclass annotations, and the value checks a field
declares with `Annotated[T, Check(...)]` (an address must be one a socket can dial);
anything off raises WireError (never a crash further in). A retired tag (a message whose
layout changed, now under a new tag) is refused naming what it was. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

PROTOCOL_VERSION = 2
HEADER = struct.Struct("!BH")
# Default cap on one message's body; processes pass their configured limit.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """A value check for a field annotated `Annotated[T, Check(...)]`: a decoded value
    must satisfy `holds`, else the message is rejected saying it must be `what`."""

    what: str
    holds: Callable[[Any], bool]


class WireError(Exception):
    """A message that can't be accepted. `code` follows HTTP: 400 bad input, 413 too big,
    426 protocol version mismatch."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_Convert = Callable[[Any], Any]


class Registry:
    """Maps message classes to u16 tags and back; compiles one field checker per class."""

    def __init__(self) -> None:
        self._tag_of: dict[type, int] = {}
        self._class_of: dict[int, type] = {}
        self._retired: dict[int, str] = {}  # tag -> what it was
        self._body_of: dict[type, type] = {}  # message class -> its body's type
        self._fields: dict[type, tuple[tuple[str, _Convert], ...]] = {}
        self._num_required: dict[type, int] = {}  # leading fields a sender must send
        # min_fields and the defaults of the fields after them (types given min_fields)
        self._trim: dict[type, tuple[int, tuple[Any, ...]]] = {}

    def message(self, tag: int, *, min_fields: int | None = None,
                body: type | None = None) -> Callable[[type[T]], type[T]]:
        """Class decorator registering a frozen kw-only dataclass under `tag` (min_fields
        as in `struct`). body: the type of its last field, `body: bytes`, which travels
        encoded as a frame of its own (module doc)."""

        def register(cls: type[T]) -> type[T]:
            if tag in self._class_of:
                raise ValueError(f"tag {tag} already used by {self._class_of[tag].__name__}")
            if tag in self._retired:
                raise ValueError(f"tag {tag} is retired ({self._retired[tag]})")
            if body is not None:
                last = dataclasses.fields(cls)[-1]
                if last.name != "body" or typing.get_type_hints(cls)["body"] is not bytes:
                    raise TypeError(f"{cls.__name__}: a message with a body ends in body: bytes")
                self._register_struct(body)
                self._body_of[cls] = body
            self._register_struct(cls, min_fields=min_fields)
            self._tag_of[cls] = tag
            self._class_of[tag] = cls
            return cls

        return register

    def retire(self, tag: int, what: str) -> None:
        """A tag no message may use again: a peer that still sends it gets a 426 naming
        `what` (the message it was, and why it moved)."""
        if tag in self._class_of:
            raise ValueError(f"tag {tag} is in use by {self._class_of[tag].__name__}")
        self._retired[tag] = what

    def struct(self, cls: type[T], *, min_fields: int | None = None) -> type[T]:
        """Register a nested value type (no tag of its own). min_fields: the fields the
        type had when the protocol version began (a peer of that version expects them all).
        Fields added since, at the end with defaults, are left out of the encoding while
        they hold their default, so an older peer reads every message that uses none of
        them; a decoder fills them in when missing."""
        self._register_struct(cls, min_fields=min_fields)
        return cls

    def _register_struct(self, cls: type, *, min_fields: int | None = None) -> None:
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls)
        if cls in self._body_of:
            fields = fields[:-1]  # body: a frame of its own
        self._fields[cls] = tuple(
            (f.name, self._converter(hints[f.name], f"{cls.__name__}.{f.name}")) for f in fields
        )
        has_default = [f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING for f in fields]
        required = len(fields)
        while required and has_default[required - 1]:
            required -= 1
        self._num_required[cls] = max(required, min_fields or 0)
        if min_fields is not None:
            self._trim[cls] = (min_fields, tuple(
                f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in fields[min_fields:]))

    def tag_of(self, cls: type) -> int:
        return self._tag_of[cls]

    @property
    def message_classes(self) -> tuple[type, ...]:
        return tuple(self._tag_of)

    # ---- encoding ---------------------------------------------------------------------

    def _to_plain(self, value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            values = [getattr(value, name) for name, _ in self._fields[type(value)]]
            trim = self._trim.get(type(value))
            if trim is not None:  # drop trailing fields that hold their default
                keep, defaults = trim
                while len(values) > keep and _same(values[-1], defaults[len(values) - keep - 1]):
                    values.pop()
            return [self._to_plain(v) for v in values]
        if isinstance(value, tuple | list) and value and dataclasses.is_dataclass(value[0]):
            return [self._to_plain(v) for v in value]
        return value  # scalars, and sequences of scalars: msgpack packs tuples as arrays

    def encode(self, msg: Any) -> list[bytes]:
        tag = self._tag_of.get(type(msg))
        if tag is None:
            raise TypeError(f"{type(msg).__name__} is not a registered message")
        fields = msgpack.packb(self._to_plain(msg), use_bin_type=True)
        if type(msg) in self._body_of:
            return [HEADER.pack(PROTOCOL_VERSION, tag), fields, msg.body]
        return [HEADER.pack(PROTOCOL_VERSION, tag), fields]

    def encode_body(self, body: Any) -> bytes:
        """A body type's value, as a message's `body` field carries it."""
        if type(body) not in self._body_of.values():
            raise TypeError(f"{type(body).__name__} is not a registered body type")
        return msgpack.packb(self._to_plain(body), use_bin_type=True)

    # ---- decoding ---------------------------------------------------------------------

    def decode(
        self,
        frames: list[bytes],
        expected: tuple[type, ...] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> Any:
        """Decode [header, fields(, body)]; raise WireError for anything malformed or
        unexpected. A body frame is checked for size only (`decode_body` reads it)."""
        if len(frames) not in (2, 3):
            raise WireError(400, f"expected 2 frames (header, body), got {len(frames)}")
        tag = peek_tag(frames[0])
        cls = self._class_of.get(tag)
        if cls is None:
            if tag in self._retired:
                raise WireError(426, f"message tag {tag} is retired ({self._retired[tag]}): "
                                     "the peer runs an older Ferry")
            raise WireError(400, f"unknown message tag {tag}")
        if expected is not None and cls not in expected:
            raise WireError(400, f"{cls.__name__} is not accepted on this socket")
        has_body = cls in self._body_of
        if len(frames) != 2 + has_body:
            raise WireError(400, f"{cls.__name__}: expected {2 + has_body} frames, got {len(frames)}")
        for frame in frames[1:]:
            if len(frame) > max_frame_bytes:
                raise WireError(413, f"{cls.__name__} frame of {len(frame)} bytes exceeds "
                                     f"{max_frame_bytes}")
        plain = _unpack(frames[1], cls.__name__)
        if not has_body:
            return self._build(cls, plain, cls.__name__)
        body = frames[2] if type(frames[2]) is bytes else bytes(frames[2])
        return self._build(cls, plain, cls.__name__, body=body)

    def decode_body(self, msg: Any, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Any:
        """msg's body (its `body` bytes), decoded as strictly as a message; WireError if
        malformed."""
        cls = self._body_of[type(msg)]
        where = f"{type(msg).__name__}.body"
        if len(msg.body) > max_frame_bytes:
            raise WireError(413, f"{where} of {len(msg.body)} bytes exceeds {max_frame_bytes}")
        return self._build(cls, _unpack(msg.body, where), where)

    def _build(self, cls: type, plain: Any, where: str, **extra: Any) -> Any:
        fields = self._fields[cls]
        if not isinstance(plain, list):
            raise WireError(400, f"{where}: expected an array of fields")
        # An older sender omits trailing fields added since with a default: they take it.
        required = self._num_required[cls]
        if not required <= len(plain) <= len(fields):
            expected = len(fields) if required == len(fields) else f"{required} to {len(fields)}"
            raise WireError(400, f"{where}: expected {expected} fields, got {len(plain)}")
        kwargs = {name: convert(value)
                  for (name, convert), value in zip(fields[: len(plain)], plain, strict=True)}
        try:
            msg = cls(**kwargs, **extra)
        except (TypeError, ValueError) as exc:
            raise WireError(400, f"{where}: {exc}") from None
        return msg

    def _converter(self, hint: Any, where: str) -> _Convert:
        """A function that checks a decoded msgpack value against `hint` and returns the
        Python value (tuples for tuple fields, instances for nested structs)."""
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            base, *extras = typing.get_args(hint)
            convert = self._converter(base, where)
            checks = [c for c in extras if isinstance(c, Check)]

            def checked(value: Any) -> Any:
                value = convert(value)
                for check in checks:
                    if not check.holds(value):
                        raise WireError(400, f"{where}: {value!r:.80} is not {check.what}")
                return value

            return checked
        if origin in (types.UnionType, typing.Union):
            options = [self._converter(a, where) for a in typing.get_args(hint) if a is not type(None)]
            nullable = type(None) in typing.get_args(hint)
            if len(options) != 1:
                raise TypeError(f"{where}: only `X | None` unions are supported")
            inner = options[0]

            def optional(value: Any) -> Any:
                return None if value is None and nullable else inner(value)

            return optional
        if origin is tuple:
            args = typing.get_args(hint)
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"{where}: only tuple[X, ...] is supported")
            item = self._converter(args[0], where + "[]")

            scalar = args[0] if args[0] in (int, str) else None

            def sequence(value: Any) -> tuple:
                if not isinstance(value, list):
                    raise WireError(400, f"{where}: expected an array, got {type(value).__name__}")
                # Fast path for the common tuple[int, ...] / tuple[str, ...] (token ids).
                if scalar is not None and all(type(v) is scalar for v in value):
                    return tuple(value)
                return tuple(item(v) for v in value)

            return sequence
        if origin is dict:
            key_hint, value_hint = typing.get_args(hint)
            key_of, value_of = self._converter(key_hint, where), self._converter(value_hint, where)

            def mapping(value: Any) -> dict:
                if not isinstance(value, dict):
                    raise WireError(400, f"{where}: expected a map, got {type(value).__name__}")
                return {key_of(k): value_of(v) for k, v in value.items()}

            return mapping
        if dataclasses.is_dataclass(hint):
            if hint not in self._fields:
                self._register_struct(hint)
            return lambda value: self._build(hint, value, where)
        if hint is bool:
            return _exact(bool, where)
        if hint is int:
            return _integer(where)
        if hint is float:
            return _number(where)
        if hint in (str, bytes):
            return _exact(hint, where)
        raise TypeError(f"{where}: unsupported field type {hint!r}")


def _unpack(frame: bytes, where: str) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(400, f"{where}: malformed msgpack body ({exc})") from None


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default


def _exact(kind: type, where: str) -> _Convert:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise WireError(400, f"{where}: expected {kind.__name__}, got {type(value).__name__}")
        return value

    return check


def _integer(where: str) -> _Convert:
    def check(value: Any) -> int:
        if type(value) is not int:  # bool is rejected on purpose
            raise WireError(400, f"{where}: expected int, got {type(value).__name__}")
        return value

    return check


def _number(where: str) -> _Convert:
    def check(value: Any) -> float:
        if type(value) not in (int, float):
            raise WireError(400, f"{where}: expected a number, got {type(value).__name__}")
        return float(value)

    return check


def peek_tag(header: bytes) -> int:
    """The message tag from a header frame, checking its size and protocol version."""
    if len(header) != HEADER.size:
        raise WireError(400, f"bad header frame of {len(header)} bytes")
    version, tag = HEADER.unpack(header)
    if version != PROTOCOL_VERSION:
        raise WireError(
            426, f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})"
        )
    return tag
