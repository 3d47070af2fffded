"""Poison for `ferry bench chaos`: malformed frames, wrong types, bad addresses and unknown
tags on every internal socket, sent from a socket of its own (a separate ZMQ context).

PULL inboxes (scheduler, both gateways, every worker) answer nothing: each process must
log the rejection and serve on. ROUTERs (each gateway's SDK endpoint, the scheduler's
admin) must answer with an error. A few well-formed but stray messages go too (output for
an unknown request, a stale attempt of a live one, an abort nobody asked for, a request
whose reply address nobody listens on): harmless by design, and checked to stay so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import zmq

from ferry.common import wire
from ferry.common.codec import HEADER, PROTOCOL_VERSION
from ferry.common.sampling import SamplingParams

# Address fields a process would later dial: each must be refused when decoded.
BAD_ADDRS = ("", "garbage", "tcp://", "tcp://*:5600", "tcp://127.0.0.1:0",
             "tcp://127.0.0.1:70000", "tcp://127.0.0.1", "udp://127.0.0.1:5",
             "tcp://" + "a" * 5000 + ":1", "tcp://127.0.0.1:5600\n", "tcp://[::1:5",
             "ipc://", "tcp://h\u00e9llo:5")
NOWHERE = "tcp://127.0.0.1:1"  # well-formed, nobody listens
OVER_LIMIT_BYTES = 17 * 2**20  # past the 16 MiB frame limit, under libzmq's hard cap


def _header(cls: type, version: int = PROTOCOL_VERSION) -> bytes:
    return HEADER.pack(version, wire.REGISTRY.tag_of(cls))


def _forged(msg: Any, **fields: Any) -> list[bytes]:
    """msg encoded with `fields` replaced, unchecked (encoding never validates)."""
    return wire.encode(dataclasses.replace(msg, **fields))


def _sampling(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=1, ignore_eos=True)


def _dispatch(reply_addr: str, req_id: str = "poison-req", **body_fields: Any) -> wire.Dispatch:
    body = wire.DispatchBody(req_id=req_id, attempt=0, prompt_token_ids=(5, 6, 7),
                             output_token_ids=(), sampling=_sampling(), arrival_s=0.0)
    return wire.Dispatch.of(dataclasses.replace(body, **body_fields), priority=0,
                            reply_addr=reply_addr)


def _forged_body(msg: wire.Dispatch, **fields: Any) -> list[bytes]:
    """msg encoded with its body's `fields` replaced, unchecked: a well-formed header, which
    is all a scheduler reads, over a body its worker refuses."""
    body = dataclasses.replace(wire.decode_body(msg), **fields)
    return wire.encode(dataclasses.replace(msg, body=wire.encode_body(body)))


Case = tuple[str, list[bytes], bool]  # (name, frames, must be refused)


def _refused(cases: list[tuple[str, list[bytes]]]) -> list[Case]:
    return [(name, frames, True) for name, frames in cases]


def generic() -> list[Case]:
    """Frames every socket must refuse, whatever it expects."""
    abort = _header(wire.Abort)
    return _refused([
        ("bad header", [b"not-a-header", b"x"]),
        ("one frame", [b"one frame only"]),
        ("three frames", [abort, msgpack.packb(["r", "x", None]), b"extra"]),
        ("empty frames", [b"", b""]),
        ("unknown tag", [HEADER.pack(PROTOCOL_VERSION, 9999), msgpack.packb([])]),
        ("unknown tag 0", [HEADER.pack(PROTOCOL_VERSION, 0), msgpack.packb([1])]),
        ("other protocol version", [_header(wire.Abort, PROTOCOL_VERSION + 1),
                                    msgpack.packb(["r", "x", None])]),
        ("malformed msgpack", [abort, b"\xc1\xc1\xc1"]),
        ("truncated msgpack", [abort, msgpack.packb(["r", "x", None])[:-2]]),
        ("map body", [abort, msgpack.packb({"req_id": "r", "reason": "x"})]),
        ("wrong field count", [abort, msgpack.packb(["r"])]),
        ("wrong field types", [abort, msgpack.packb([1, 2, "three"])]),
        ("bool for int", [abort, msgpack.packb(["r", "x", True])]),
        ("bytes for str", [abort, msgpack.packb([b"r", "x", None], use_bin_type=True)]),
        ("nested 100k deep", [abort, b"\x91" * 100_000 + b"\xc0"]),
        ("array32 header, no data", [abort, b"\xdd\xff\xff\xff\xff"]),
        ("over the frame limit", [abort, b"\x00" * OVER_LIMIT_BYTES]),
    ])


def scheduler_inbox() -> list[Case]:
    cases: list[Case] = []
    for addr in BAD_ADDRS:
        cases += _refused([
            (f"Dispatch.reply_addr={addr[:24]!r}", _forged(_dispatch(NOWHERE), reply_addr=addr)),
            (f"GatewayHello.inbox_addr={addr[:24]!r}", wire.encode(wire.GatewayHello(
                gateway_id="poison", inbox_addr=addr, req_id_prefix="poison-"))),
            (f"Register.inbox_addr={addr[:24]!r}", wire.encode(wire.Register(
                instance_id="poison-instance", inbox_addr=addr, num_blocks=1000, block_size=16,
                max_model_len=4096, req_ids=()))),
        ])
    dispatch = _dispatch(NOWHERE)
    cases += _refused([
        ("Dispatch, str prefix hash", _forged(dispatch, prefix_hashes=(5, "six"))),
        ("Dispatch, negative prompt_len", _forged(dispatch, prompt_len=-3)),
        ("Dispatch, float attempt", _forged(dispatch, attempt=1.5)),
        ("Dispatch without its body frame", wire.encode(dispatch)[:2]),
        ("Tokens on the scheduler's socket", wire.encode(wire.Tokens(
            req_id="x", instance_id="y", first_index=0, token_ids=(1,), finish_reason=None))),
        ("LoadReport, bad inbox_addr", _forged(_load_report(), inbox_addr="nope")),
    ])
    # Well-formed: taken, and harmless. The requests reply where nobody listens; each runs
    # its 8 tokens and frees its blocks, or (a bad body, which the scheduler forwards
    # unread) its worker refuses it with a RequestError that goes nowhere.
    cases += [
        ("Release of an unknown request",
         wire.encode(wire.Release(req_id="poison-unknown", reason="abort")), False),
        ("Dispatch replying nowhere, attempt 2**64-1",
         wire.encode(_dispatch(NOWHERE, "poison-nowhere-2", attempt=2**64 - 1)), False),
        ("Dispatch replying nowhere", wire.encode(_dispatch(NOWHERE, "poison-nowhere-1")), False),
        ("Dispatch, str token id in its body",
         _forged_body(_dispatch(NOWHERE, "poison-body-1"), prompt_token_ids=(5, "six", 7)),
         False),
        ("Dispatch, sampling not a struct in its body",
         _forged_body(_dispatch(NOWHERE, "poison-body-2"), sampling=[1, 2]), False),
        ("Dispatch, another request's body",
         _forged_body(_dispatch(NOWHERE, "poison-body-3"), req_id="poison-body-other"), False),
    ]
    return cases


def _load_report() -> wire.LoadReport:
    return wire.LoadReport(instance_id="poison-instance", inbox_addr=NOWHERE, seq=1,
                           num_dispatch_received=0, load=wire.LoadFields(
                               num_total_blocks=10, num_free_blocks=10, num_reserved_blocks=0,
                               num_running=0, num_waiting=0, head_demand_blocks=0,
                               waiting_demand_blocks=0, used_blocks_high=0, num_running_high=0,
                               num_migrations_in=0, num_migrations_out=0, draining=False,
                               step_time_ewma_s=0.0, num_preemptions=0))


def gateway_inbox(live_req_ids: list[str]) -> list[Case]:
    cases = _refused([
        ("InstanceView, bad inbox_addr", wire.encode(wire.InstanceView(
            scheduler_epoch="poison", instances=(wire.InstanceAddr(instance_id="w",
                                                                   inbox_addr="bogus"),)))),
        ("Tokens, str token", _forged(_tokens("poison-unknown"), token_ids=(1, "2"))),
        ("Placement, wrong types", _forged(wire.Placement(req_id="r", instance_id="w"),
                                           instance_id=7)),
        ("Dispatch on the gateway's socket", wire.encode(_dispatch(NOWHERE))),
    ])
    cases += [
        ("Tokens, negative first_index", _forged(_tokens("poison-unknown"), first_index=-1),
         False),
        ("Tokens for an unknown request", wire.encode(_tokens("poison-unknown")), False),
        ("RequestError for an unknown request", wire.encode(wire.RequestError(
            req_id="poison-unknown", instance_id="w", code=500, message="poison")), False),
    ]
    # Output of an attempt that is not the current one: ignored (the gateway takes the
    # current attempt's only) and the holder told to drop that copy, which it has not.
    for req_id in live_req_ids[:4]:
        cases.append((f"Tokens of a stale attempt of {req_id}", wire.encode(wire.Tokens(
            req_id=req_id, instance_id="worker-0", first_index=0, token_ids=(1, 2, 3),
            finish_reason="abort", attempt=99)), False))
    return cases


def _tokens(req_id: str) -> wire.Tokens:
    return wire.Tokens(req_id=req_id, instance_id="w", first_index=0, token_ids=(1, 2),
                       finish_reason=None)


def worker_inbox(instance_id: str) -> list[Case]:
    cases: list[Case] = []
    for addr in BAD_ADDRS:
        cases += _refused([
            (f"Dispatch.reply_addr={addr[:24]!r}", _forged(_dispatch(NOWHERE), reply_addr=addr)),
            (f"GatewayGone.inbox_addr={addr[:24]!r}", wire.encode(wire.GatewayGone(
                inbox_addr=addr, req_id_prefix="poison-"))),
            (f"MigrateOut.dst_inbox_addr={addr[:24]!r}", wire.encode(wire.MigrateOut(
                migration_id="poison-mig", dst_instance_id="w", dst_inbox_addr=addr,
                req_id=None))),
            (f"MigPrealloc.src_inbox_addr={addr[:24]!r}", wire.encode(wire.MigPrealloc(
                migration_id="poison-mig", req_id="r", src_instance_id="w",
                src_inbox_addr=addr, num_blocks=1, kv_block_bytes=1, group_id=None))),
        ])
    cases += _refused([
        ("MigCommit, bad reply_addr in its state", wire.encode(wire.MigCommit(
            migration_id="poison-mig", state=wire.RequestState(
                req_id="r", output_token_ids=(), num_delivered=0, sampling=_sampling(),
                priority=0, reply_addr="bogus", arrival_s=0.0, num_computed_tokens=0,
                num_preemptions=0)))),
        ("LoadReport on a worker's socket", wire.encode(_load_report())),
    ])
    cases += [
        ("MigAbort of an unknown migration", wire.encode(wire.MigAbort(
            migration_id="poison-unknown", reason="poison")), False),
        ("MigStageAck of an unknown migration", wire.encode(wire.MigStageAck(
            migration_id="poison-unknown", stage_index=0, ok=True, reason="")), False),
        ("Abort of an unknown request",
         wire.encode(wire.Abort(req_id="poison-unknown", reason="poison")), False),
        # Decoded, then refused by the engine (its RequestError goes nowhere).
        ("Dispatch, negative token id", wire.encode(_dispatch(
            NOWHERE, f"poison-negative-{instance_id}", prompt_token_ids=(-5,))), False),
        ("Dispatch replying nowhere",
         wire.encode(_dispatch(NOWHERE, f"poison-nowhere-{instance_id}")), False),
        # The header decoded, the body refused (RequestError, nowhere): malformed, or
        # another request's.
        ("Dispatch, str token id in its body", _forged_body(
            _dispatch(NOWHERE, f"poison-body-{instance_id}"), prompt_token_ids=(5, "six")),
         False),
        ("Dispatch, body of another attempt", _forged_body(
            _dispatch(NOWHERE, f"poison-body-{instance_id}"), attempt=3), False),
    ]
    return cases


def router_cases() -> list[Case]:
    """For the SDK and admin ROUTERs: each must get an error answer."""
    req = wire.GenerateRequest(client_req_id="poison", prompt=None, prompt_token_ids=(1, 2),
                               sampling=_sampling(), priority=0, stream=True, timeout_s=5.0)
    return generic() + _refused([
        ("GenerateRequest, str token", _forged(req, prompt_token_ids=(1, "x"))),
        ("GenerateRequest, priority str", _forged(req, priority="high")),
        ("StatusRequest with fields", [_header(wire.StatusRequest), msgpack.packb([1, 2])]),
        ("DrainCommand, NaN timeout", wire.encode(wire.DrainCommand(
            instance_id="worker-0", timeout_s=float("nan"), cancel=True))),
        ("MigrateCommand, unknown request", wire.encode(wire.MigrateCommand(
            req_id="poison-unknown", dst_instance_id="worker-0", timeout_s=1.0))),
    ])


def send_all(pulls: dict[str, tuple[str, list[Case]]],
             routers: dict[str, tuple[str, list[Case]]], reply_timeout_s: float = 3.0) -> dict:
    """Send every case from a context of its own and collect what the ROUTERs answer.
    pulls / routers: target name -> (address, cases). Returns per target the cases sent,
    how many must be refused, and for ROUTERs the cases answered with no error."""
    ctx = zmq.Context()
    out: dict[str, Any] = {}
    try:
        for name, (addr, cases) in pulls.items():
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 5000)
            sock.setsockopt(zmq.SNDTIMEO, 5000)
            sock.connect(addr)
            for _, frames, _ in cases:
                sock.send_multipart(frames)
            sock.close()  # lingers until sent
            out[name] = {"addr": addr, "sent": len(cases),
                         "must_refuse": sum(refuse for _, _, refuse in cases)}
        for name, (addr, cases) in routers.items():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            not_refused: dict[str, Any] = {}
            for case, frames, _ in cases:
                sock.send_multipart(frames)
                if not sock.poll(int(reply_timeout_s * 1000)):
                    not_refused[case] = "no answer"
                    continue
                frames = sock.recv_multipart()
                if len(frames) == 3 and frames[0] == b"":
                    # The first frame was empty: the admin socket takes it for a REQ
                    # client's delimiter and answers with one.
                    frames = frames[1:]
                try:
                    reply = wire.decode(frames)
                except wire.WireError as err:
                    not_refused[case] = f"undecodable answer: {err.message}"
                    continue
                if not isinstance(reply, wire.ErrorReply | wire.AdminError):
                    not_refused[case] = type(reply).__name__
            sock.close()
            out[name] = {"addr": addr, "sent": len(cases), "not_refused": not_refused}
    finally:
        ctx.term()
    return out
