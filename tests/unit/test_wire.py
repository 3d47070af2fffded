"""Round trip of every message, and strict rejection of malformed input."""

from __future__ import annotations

import dataclasses
import types
import typing

import msgpack
import pytest

from ferry.common import wire
from ferry.common.codec import HEADER, PROTOCOL_VERSION, WireError
from ferry.common.sampling import SamplingParams


def example(hint, depth=0):
    """A non-default example value for a field annotation."""
    if hint is wire.DialAddr:
        return "tcp://host-1:5600"
    if hint is wire.HostPortOrEmpty:
        return "host-1:29500"
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:  # a value check (wire.Count): 7 passes the ones used
        return example(typing.get_args(hint)[0], depth)
    if origin in (types.UnionType, typing.Union):
        return example(next(a for a in typing.get_args(hint) if a is not type(None)), depth)
    if origin is tuple:
        return (example(typing.get_args(hint)[0], depth), example(typing.get_args(hint)[0], depth))
    if origin is dict:
        k, v = typing.get_args(hint)
        return {example(k, depth): example(v, depth)}
    if dataclasses.is_dataclass(hint):
        return build(hint, depth + 1)
    return {bool: True, int: 7, float: 2.5, str: "x", bytes: b"\x00\x01"}[hint]


def build(cls, depth=0):
    if cls is SamplingParams:
        return SamplingParams(max_tokens=5, temperature=0.7, top_k=3, top_p=0.9, seed=11,
                              stop_token_ids=(2, 3), ignore_eos=True, stop=("\n\n",),
                              presence_penalty=0.5, frequency_penalty=-0.5,
                              repetition_penalty=1.2, min_p=0.1, min_tokens=2,
                              logit_bias_token_ids=(4, 9), logit_bias_values=(-100.0, 2.5),
                              logprobs=3, include_stop_str_in_output=True,
                              skip_special_tokens=False, grammar_kind="json",
                              grammar='{"type": "object"}')
    hints = typing.get_type_hints(cls, include_extras=True)
    return cls(**{f.name: example(hints[f.name], depth) for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("cls", wire.REGISTRY.message_classes, ids=lambda c: c.__name__)
def test_every_message_round_trips(cls):
    if cls is wire.Dispatch:  # (its header is derived from its body)
        msg = wire.Dispatch.of(build(wire.DispatchBody), priority=1,
                               reply_addr="tcp://host-1:5600", prefix_hashes=(3, 4))
        assert wire.decode_body(msg) == build(wire.DispatchBody)
    elif cls is wire.PullPrefix:  # (it carries a Dispatch, header and body)
        dispatch = wire.Dispatch.of(build(wire.DispatchBody), priority=1,
                                    reply_addr="tcp://host-1:5600", prefix_hashes=(3, 4))
        msg = wire.PullPrefix.carrying(dispatch, pull_id="p", src_instance_id="w",
                                       src_inbox_addr="tcp://host-2:5600", block_hashes=(3,))
        assert msg.dispatch == dispatch
        assert wire.decode_body(msg) == build(wire.DispatchBody)
    else:
        msg = build(cls)
    frames = wire.encode(msg)
    assert wire.peek_tag(frames[0]) == wire.REGISTRY.tag_of(cls)
    assert wire.decode(frames) == msg


def test_a_dispatch_body_travels_as_its_own_frame_unread():
    """A router decodes the header (what it places by); the body frame's bytes pass
    through untouched, checked for size only; the worker decodes them strictly."""
    body = wire.DispatchBody(req_id="r", attempt=2, prompt_token_ids=tuple(range(100)),
                             output_token_ids=(7, 8), sampling=SamplingParams(max_tokens=3),
                             arrival_s=1.5)
    msg = wire.Dispatch.of(body, priority=1, reply_addr="tcp://gw:1", prefix_hashes=(9,))
    assert (msg.req_id, msg.attempt, msg.prompt_len) == ("r", 2, 102)
    header, fields, body_frame = wire.encode(msg)
    assert body_frame is msg.body and len(fields) < 40
    garbage = wire.decode([header, fields, b"\xc1 not msgpack"])  # not read: taken
    assert garbage.req_id == "r" and garbage.body == b"\xc1 not msgpack"
    with pytest.raises(WireError, match="Dispatch.body: malformed msgpack"):
        wire.decode_body(garbage)
    with pytest.raises(WireError, match="Dispatch: expected 3 frames, got 2"):
        wire.decode([header, fields])
    with pytest.raises(WireError) as err:
        wire.decode([header, fields, body_frame], max_frame_bytes=100)
    assert err.value.code == 413
    with pytest.raises(WireError) as err:
        wire.decode_body(msg, max_frame_bytes=100)
    assert err.value.code == 413
    bad = wire.encode_body(dataclasses.replace(body, prompt_token_ids=(1, "2")))
    with pytest.raises(WireError, match=r"DispatchBody.prompt_token_ids\[\]: expected int"):
        wire.decode_body(dataclasses.replace(msg, body=bad))
    with pytest.raises(WireError, match="prompt_len: -1 is not a count"):
        wire.decode(wire.encode(dataclasses.replace(msg, prompt_len=-1)))


def test_a_dispatch_names_what_is_wrong_with_a_body_not_its_own():
    body = wire.DispatchBody(req_id="r", attempt=1, prompt_token_ids=(1, 2),
                             output_token_ids=(3,), sampling=SamplingParams(max_tokens=3),
                             arrival_s=0.0)
    msg = wire.Dispatch.of(body, priority=0, reply_addr="tcp://gw:1")
    assert msg.mismatch(body) is None
    assert "body of 'x' attempt 1" in msg.mismatch(dataclasses.replace(body, req_id="x"))
    assert "attempt 0 under" in msg.mismatch(dataclasses.replace(body, attempt=0))
    assert msg.mismatch(dataclasses.replace(body, output_token_ids=())) == (
        "body of 2 tokens under a header of 3")


def test_optional_fields_round_trip_as_none():
    msg = wire.MigrateOut(migration_id="m", dst_instance_id="d", dst_inbox_addr="tcp://x:1", req_id=None)
    assert wire.decode(wire.encode(msg)) == msg


def _frames(tag, body_obj):
    return [HEADER.pack(PROTOCOL_VERSION, tag), msgpack.packb(body_obj)]


def test_rejects_unknown_tag():
    with pytest.raises(WireError, match="unknown message tag"):
        wire.decode(_frames(999, []))


def test_rejects_other_protocol_version():
    frames = wire.encode(wire.Abort(req_id="r", reason="x"))
    frames[0] = HEADER.pack(PROTOCOL_VERSION + 1, wire.REGISTRY.tag_of(wire.Abort))
    with pytest.raises(WireError) as err:
        wire.decode(frames)
    assert err.value.code == 426


def test_a_retired_tag_is_refused_by_name():
    """A message that changed layout moved to a new tag: a peer of an older Ferry that
    still sends the old one gets a clear 426, and no new message can take the tag."""
    with pytest.raises(WireError, match=r"tag 61 is retired \(MigPreallocReply") as err:
        wire.decode(_frames(61, ["m", True, "", "g", "host:1", 1]))
    assert err.value.code == 426
    with pytest.raises(WireError, match=r"tag 10 is retired \(Dispatch") as err:
        wire.decode(_frames(10, ["r", [1], [], [5, 0.5, 0, 1.0, 3, [], False, []], 0,
                                 "tcp://a:1", 1.0, 0]))
    assert err.value.code == 426

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Newcomer:
        x: int

    with pytest.raises(ValueError, match="tag 61 is retired"):
        wire.REGISTRY.message(61)(Newcomer)


def test_rejects_malformed_msgpack():
    frames = [wire.encode(wire.Abort(req_id="r", reason="x"))[0], b"\xc1\xff\x00"]
    with pytest.raises(WireError, match="malformed"):
        wire.decode(frames)


def test_rejects_wrong_field_types():
    tag = wire.REGISTRY.tag_of(wire.Abort)
    with pytest.raises(WireError, match="Abort.req_id: expected str"):
        wire.decode(_frames(tag, [5, "x", None]))
    with pytest.raises(WireError, match="expected 2 to 3 fields, got 1"):
        wire.decode(_frames(tag, ["r"]))
    tag = wire.REGISTRY.tag_of(wire.Tokens)
    with pytest.raises(WireError, match="expected int, got bool"):
        wire.decode(_frames(tag, ["r", "i", True, [1], None, 0]))
    with pytest.raises(WireError, match=r"token_ids\[\]: expected int"):
        wire.decode(_frames(tag, ["r", "i", 0, ["a"], None, 0]))


def test_rejects_oversized_frames():
    msg = wire.Tokens(req_id="r", instance_id="i", first_index=0, token_ids=tuple(range(1000)),
                      finish_reason=None)
    with pytest.raises(WireError) as err:
        wire.decode(wire.encode(msg), max_frame_bytes=100)
    assert err.value.code == 413


def test_rejects_message_not_expected_on_socket():
    frames = wire.encode(wire.Abort(req_id="r", reason="x"))
    with pytest.raises(WireError, match="not accepted"):
        wire.decode(frames, expected=(wire.Tokens,))


def test_rejects_bad_frame_counts_and_headers():
    with pytest.raises(WireError):
        wire.decode([b"\x01"])
    with pytest.raises(WireError, match="bad header"):
        wire.decode([b"\x01\x00", b"\x90"])


def test_trailing_fields_with_defaults_may_be_missing():
    """An older sender omits fields added since with a default; the rest stay required."""
    tag = wire.REGISTRY.tag_of(wire.Tokens)
    old = wire.decode(_frames(tag, ["r", "i", 0, [1], None, 2]))  # no logprobs
    assert (old.attempt, old.logprobs) == (2, ())
    assert old.num_cached_prompt_tokens is None
    with pytest.raises(WireError, match="expected 6 to 8 fields, got 5"):
        wire.decode(_frames(tag, ["r", "i", 0, [1], None]))  # attempt was in v2 from the start
    with pytest.raises(WireError, match="expected 6 to 8 fields, got 9"):
        wire.decode(_frames(tag, ["r", "i", 0, [1], None, 0, [], 5, 5]))  # never ignored
    with pytest.raises(WireError, match="num_cached_prompt_tokens: -1 is not a count"):
        wire.decode(_frames(tag, ["r", "i", 0, [1], None, 0, [], -1]))
    tag = wire.REGISTRY.tag_of(wire.GenerateRequest)
    sampling_v2_0 = [5, 0.5, 0, 1.0, 3, [], False, []]  # before the penalties were added
    msg = wire.decode(_frames(tag, ["c", None, [1], sampling_v2_0, 0, False, None]))
    assert msg.sampling == SamplingParams(max_tokens=5, temperature=0.5, seed=3)
    with pytest.raises(WireError,
                       match="GenerateRequest.sampling: expected 8 to 20 fields, got 7"):
        wire.decode(_frames(tag, ["c", None, [1], sampling_v2_0[:7], 0, False, None]))


def test_fields_added_since_are_left_out_at_their_defaults():
    """A message that uses none of the fields added in this protocol version encodes as
    before them, so a peer that predates them reads it."""
    sampling = SamplingParams(max_tokens=3, seed=1)
    plain = wire.Tokens(req_id="r", instance_id="i", first_index=0, token_ids=(1,),
                        finish_reason=None)
    assert len(msgpack.unpackb(wire.encode(plain)[1])) == 6  # attempt stays (v2 had it)
    # Only the first output of a request says how much of its prompt was cached
    assert len(msgpack.unpackb(wire.encode(dataclasses.replace(
        plain, num_cached_prompt_tokens=32))[1])) == 8
    chunk = wire.TokenChunk(client_req_id="c", req_id="r", first_index=0, token_ids=(1,),
                            text="a", finish_reason=None, num_prompt_tokens=40)
    assert len(msgpack.unpackb(wire.encode(chunk)[1])) == 7
    # A RequestState without it (migrated after its first output) encodes as before
    state = wire.RequestState(req_id="r", output_token_ids=(5,), num_delivered=1,
                              sampling=sampling, priority=0, reply_addr="tcp://gw:1",
                              arrival_s=1.0, num_computed_tokens=33, num_preemptions=0)
    commit = wire.MigCommit(migration_id="m", state=state)
    assert len(msgpack.unpackb(wire.encode(commit)[1])[1]) == 10
    request = wire.GenerateRequest(client_req_id="c", prompt=None, prompt_token_ids=(1,),
                                   sampling=sampling, priority=0, stream=False, timeout_s=None)
    assert len(msgpack.unpackb(wire.encode(request)[1])[3]) == 8
    penalized = dataclasses.replace(request, sampling=dataclasses.replace(
        sampling, skip_special_tokens=False))
    assert len(msgpack.unpackb(wire.encode(penalized)[1])[3]) == 18
    constrained = dataclasses.replace(request, sampling=dataclasses.replace(
        sampling, grammar_kind="regex", grammar="[a-z]+"))
    assert len(msgpack.unpackb(wire.encode(constrained)[1])[3]) == 20
    for msg in (plain, chunk, commit, request, penalized, constrained):
        assert wire.decode(wire.encode(msg)) == msg


def test_nested_struct_checked():
    tag = wire.REGISTRY.tag_of(wire.CancelRequest)
    assert wire.decode(_frames(tag, ["c", None])) == wire.CancelRequest(client_req_id="c")
    tag = wire.REGISTRY.tag_of(wire.GenerateRequest)
    bad_sampling = [5, "hot", 0, 1.0, None, [], False, []]
    with pytest.raises(WireError, match="temperature: expected a number"):
        wire.decode(_frames(tag, ["c", None, [1], bad_sampling, 0, False, None]))


@pytest.mark.parametrize("addr", ["tcp://bad", "tcp://*:5600", "tcp://h:0", "tcp://h:70000",
                                  "", "http://h:1", "tcp://h:1 ", "tcp://-h:1",
                                  # longer than any DNS name or label (`ferry bench chaos`
                                  # planted a fake instance and gateway with the first)
                                  "tcp://" + "a" * 5000 + ":1", "tcp://" + "a" * 64 + ".b:1",
                                  "tcp://" + "a." * 127 + "b:1",
                                  "ipc:///" + "p" * 107])
def test_address_fields_must_be_dialable(addr):
    """A peer could otherwise plant an address that fails every later send to it."""
    good = wire.GatewayHello(gateway_id="g", inbox_addr="tcp://gw-1:5602", req_id_prefix="g-1-")
    assert wire.decode(wire.encode(good)) == good
    bad = dataclasses.replace(good, inbox_addr=addr)
    with pytest.raises(WireError, match="GatewayHello.inbox_addr: .* is not a ZMQ endpoint"):
        wire.decode(wire.encode(bad))


def test_dialable_addresses_are_accepted():
    for addr in ("tcp://127.0.0.1:5600", "tcp://[::1]:80", "tcp://worker-0.ferry:5700",
                 "ipc:///tmp/ferry.sock", "inproc://w0", "tcp://" + "a" * 63 + ".b:1",
                 "tcp://" + "a." * 126 + "b:1", "ipc:///" + "p" * 106):
        assert wire.is_endpoint(addr), addr
    assert wire.is_host_port_or_empty("") and wire.is_host_port_or_empty("10.0.0.2:29500")
    assert not wire.is_host_port_or_empty("10.0.0.2")
    assert not wire.is_host_port_or_empty("a" * 254 + ":29500")


def test_tags_are_unique_and_small():
    tags = [wire.REGISTRY.tag_of(c) for c in wire.REGISTRY.message_classes]
    assert len(tags) == len(set(tags))
    assert all(0 < t < 2**16 for t in tags)
