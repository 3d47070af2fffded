"""Every message between Ferry's processes, in one place (DESIGN.md §3).

Each message is a frozen, keyword-only dataclass registered under a u16 tag; the codec
(common/codec.py) turns it into [header, msgpack body] frames. Tags are grouped by
sender -> recipient. Extend by adding fields at the end: with a neutral default, and the
type's field count before them as its `min_fields` (then a message that leaves them at
their defaults encodes as before, so an older peer reads it, and an older sender's
message decodes with the defaults filled in). A message whose layout changes otherwise
moves to a new tag and its old tag is retired (`REGISTRY.retire`: a peer still sending
it is refused by name, and the other messages, the SDK's included, keep working across
versions); never renumber or reuse a tag.

Topology (every process binds one PULL "inbox"; peers PUSH to it; the SDK and the admin
CLI talk request/reply over ROUTER/DEALER):

    SDK client --DEALER--> gateway.sdk (ROUTER)        GenerateRequest, CancelRequest
    gateway    --PUSH--> scheduler.inbox               Dispatch, Release, GatewayHello
    scheduler  --PUSH--> worker.inbox                  Dispatch (its body forwarded unread), Abort,
                                                       MigrateOut, SetDraining, ReRegister,
                                                       GatewayGone, CacheSnapshotRequest,
                                                       PullPrefix
    scheduler  --PUSH--> gateway.inbox                 Placement, DispatchRejected,
                                                       InstanceView, InstanceDown
    worker     --PUSH--> gateway.inbox (reply_addr)    Tokens, RequestError
    worker     --PUSH--> scheduler.inbox               Register, LoadReport, MigrationDone,
                                                       Leaving, PullDone
    worker     --PUSH--> worker.inbox                  Mig* (migration control), Prefix*
                                                       and PullAbort (prefix pulls)
    ferry CLI  --DEALER--> scheduler.admin (ROUTER)    StatusRequest, MigrateCommand,
                                                       DrainCommand
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Annotated

from ferry.common.codec import PROTOCOL_VERSION, Check, Registry, WireError, peek_tag
from ferry.common.sampling import SamplingParams, TokenLogprobs

__all__ = ["PROTOCOL_VERSION", "WireError", "peek_tag", "REGISTRY", "encode", "decode",
           "encode_body", "decode_body", "Priority"]

REGISTRY = Registry()
encode = REGISTRY.encode
decode = REGISTRY.decode
encode_body = REGISTRY.encode_body
decode_body = REGISTRY.decode_body
REGISTRY.retire(10, "Dispatch with its request in one frame; now tag 13, header + body")
REGISTRY.retire(61, "MigPreallocReply with dst_rank; now tag 72")

REGISTRY.struct(SamplingParams, min_fields=8)  # max_tokens .. stop; the rest came later
REGISTRY.struct(TokenLogprobs)

_HOST = r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]*)"
_TCP_ENDPOINT = re.compile(r"tcp://" + _HOST + r":(?P<port>\d{1,5})")
_LOCAL_ENDPOINT = re.compile(r"(?:ipc|inproc)://\S+")
_HOST_PORT = re.compile(_HOST + r":(?P<port>\d{1,5})")
MAX_HOST_CHARS = 253  # a DNS name (RFC 1035), labels of at most 63 characters
MAX_IPC_PATH_BYTES = 107  # sockaddr_un.sun_path, less its terminating NUL


def _host_port_ok(match: re.Match | None) -> bool:
    if match is None or not 0 < int(match.group("port")) < 65536:
        return False
    host = match.group("host")
    return host.startswith("[") or (
        len(host) <= MAX_HOST_CHARS and all(len(label) <= 63 for label in host.split(".")))


def is_endpoint(value: str) -> bool:
    """A ZMQ address a socket can dial: tcp://HOST:PORT (a DNS name or IPv4 address, or
    [IPv6]; port 1-65535), ipc://PATH (at most 107 bytes) or inproc://NAME. Not a bind
    form (tcp://*:N)."""
    if value.startswith("tcp://"):
        return _host_port_ok(_TCP_ENDPOINT.fullmatch(value))
    if value.startswith("ipc://") and len(value[6:].encode()) > MAX_IPC_PATH_BYTES:
        return False
    return _LOCAL_ENDPOINT.fullmatch(value) is not None


def is_host_port_or_empty(value: str) -> bool:
    return value == "" or _host_port_ok(_HOST_PORT.fullmatch(value))


# Every address field a process will later send to: checked when the message is decoded,
# so a bad one is refused with the message (and logged) instead of failing a send later.
DialAddr = Annotated[str, Check("a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH)", is_endpoint)]
HostPortOrEmpty = Annotated[str, Check("HOST:PORT", is_host_port_or_empty)]
Count = Annotated[int, Check("a count (>= 0)", lambda value: value >= 0)]


class Priority(IntEnum):
    NORMAL = 0
    HIGH = 1

    @classmethod
    def parse(cls, value: str | int) -> Priority:
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"priority must be 'normal' or 'high', got {value!r}") from None
        return cls(value)


# ---------------------------------------------------------------------------------------
# SDK client <-> gateway
# ---------------------------------------------------------------------------------------


@REGISTRY.message(1)
@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateRequest:
    client_req_id: str  # chosen by the client, unique per connection; replies echo it
    prompt: str | None  # text to tokenize; exactly one of prompt / prompt_token_ids
    prompt_token_ids: tuple[int, ...] | None  # pre-tokenized prompt
    sampling: SamplingParams  # validated by the gateway
    priority: int  # Priority value
    stream: bool  # True: a TokenChunk per engine output; False: one TokenChunk at the end
    timeout_s: float | None  # whole-request deadline; None: the gateway's default
    api_key: str | None = None  # required when the gateway has keys configured


@REGISTRY.message(2)
@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest:
    client_req_id: str  # the GenerateRequest to abort
    api_key: str | None = None


@REGISTRY.message(3, min_fields=7)  # logprobs came later
@dataclass(frozen=True, slots=True, kw_only=True)
class TokenChunk:
    client_req_id: str  # echo of GenerateRequest.client_req_id
    req_id: str  # Ferry's id for the request (also the HTTP response id)
    first_index: int  # output index of token_ids[0]; chunks arrive in order, no gaps
    token_ids: tuple[int, ...]  # new output tokens
    text: str  # detokenized text delta for these tokens (stop strings already cut)
    finish_reason: str | None  # "length" | "stop" | "abort" | "timeout" | None (more to come)
    num_prompt_tokens: int  # prompt length in tokens (usage accounting)
    # One per token of token_ids when the request asked for logprobs, else ().
    logprobs: tuple[TokenLogprobs, ...] = ()
    # Of num_prompt_tokens, those whose KV came from a prefix cache (usage's cached_tokens);
    # 0 until the worker has reported it (it comes with the first output token).
    num_cached_prompt_tokens: Count = 0


@REGISTRY.message(4)
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    client_req_id: str | None  # the request it answers, None if it could not be read
    code: int  # HTTP-like: 400 bad input, 401 auth, 413 too big, 429 overloaded, 503, 504
    message: str  # human-readable reason


# ---------------------------------------------------------------------------------------
# gateway -> scheduler -> worker
# ---------------------------------------------------------------------------------------


@REGISTRY.struct
@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchBody:
    """The request itself, as only the worker reads it: the body of its Dispatch."""

    req_id: str  # == its Dispatch's (the worker refuses a body of another request)
    attempt: int  # == its Dispatch's
    prompt_token_ids: tuple[int, ...]  # the prompt
    output_token_ids: tuple[int, ...]  # tokens already delivered (failure replay), else ()
    sampling: SamplingParams  # seed resolved by the gateway (never None)
    arrival_s: float  # gateway wall clock (time.time()) when the request arrived


@REGISTRY.message(13, body=DispatchBody)
@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch:
    """Gateway -> scheduler; the scheduler forwards the same frames to the chosen worker
    (or the gateway sends it straight to a worker in bypass mode). The fields are what the
    scheduler places by, checked when decoded; `body`, the request itself (a 32k-token
    prompt is ~100 KB of it), is a frame the scheduler forwards unread. The worker decodes
    it (`decode_body`) and refuses one that is not this request's (`mismatch`). Build
    both with `Dispatch.of`."""

    req_id: str  # Ferry request id, unique cluster-wide
    # The gateway's dispatch attempt for req_id: 0, then +1 for every replay or re-dispatch.
    # Tokens and RequestError echo it; the gateway takes output from the current one only,
    # so a copy left on an instance wrongly declared dead can never reach the client.
    attempt: int
    priority: int  # Priority value
    reply_addr: DialAddr  # gateway inbox address; Tokens go there (PUSH)
    prompt_len: Count  # tokens it starts from: the body's prompt + output_token_ids
    # Prefix hashes of the full blocks of prompt + output_token_ids (common/prefix_hash.py,
    # with the cluster's seed and block size from InstanceView); () when unknown. The
    # scheduler places by them (cache-aware dispatch).
    prefix_hashes: tuple[int, ...]
    body: bytes  # DispatchBody, encoded (encode_body): a frame of its own

    @classmethod
    def of(cls, body: DispatchBody, *, priority: int, reply_addr: str,
           prefix_hashes: tuple[int, ...] = ()) -> Dispatch:
        """The Dispatch carrying body, its header taken from it."""
        return cls(req_id=body.req_id, attempt=body.attempt, priority=priority,
                   reply_addr=reply_addr,
                   prompt_len=len(body.prompt_token_ids) + len(body.output_token_ids),
                   prefix_hashes=prefix_hashes, body=encode_body(body))

    def mismatch(self, body: DispatchBody) -> str | None:
        """Why body (decoded from this message) is not this request's; None if it is."""
        if (body.req_id, body.attempt) != (self.req_id, self.attempt):
            return (f"body of {body.req_id!r} attempt {body.attempt} under the header of "
                    f"{self.req_id!r} attempt {self.attempt}")
        num_tokens = len(body.prompt_token_ids) + len(body.output_token_ids)
        if num_tokens != self.prompt_len:
            return f"body of {num_tokens} tokens under a header of {self.prompt_len}"
        return None


@REGISTRY.message(11)
@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Gateway -> scheduler: the gateway is done with req_id. Unless reason is "finished"
    the scheduler tells the holding instance to abort it."""

    req_id: str
    reason: str  # "finished" | "abort" | "timeout" | "stop" | "error"


@REGISTRY.message(12)
@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayHello:
    """Gateway -> scheduler, every 0.5 s until the first InstanceView arrives, so a new
    gateway learns the instances (and can report healthy) before its first request."""

    gateway_id: str
    inbox_addr: DialAddr  # where the scheduler sends InstanceView, Placement, ...
    # Every req_id this gateway process makes starts with it (new on each start). Sent
    # every second as the gateway's heartbeat: a gateway silent too long, or a new prefix
    # at the same inbox, makes the scheduler tell the workers to drop the old requests.
    req_id_prefix: str = ""


# ---------------------------------------------------------------------------------------
# scheduler -> gateway
# ---------------------------------------------------------------------------------------


@REGISTRY.message(20)
@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    req_id: str
    instance_id: str  # instance now holding req_id (after dispatch or a migration)


@REGISTRY.message(21)
@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchRejected:
    req_id: str
    code: int  # 503 no instance, 429 overloaded
    message: str


@REGISTRY.struct
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceAddr:
    instance_id: str
    inbox_addr: DialAddr  # worker inbox (advertised form)


@REGISTRY.message(22)
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceView:
    """Sent to gateways every second: the live instances, for bypass mode."""

    scheduler_epoch: str  # changes when the scheduler restarts
    instances: tuple[InstanceAddr, ...]
    # How gateways hash prompts for Dispatch.prefix_hashes: the instances' block size and
    # prefix-cache seed (0: no instance caches prefixes; send no hashes).
    block_size: int = 16
    prefix_seed: int = 0


@REGISTRY.message(23)
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceDown:
    """An instance missed its heartbeats; gateways replay the requests it held."""

    instance_id: str


# ---------------------------------------------------------------------------------------
# worker -> gateway
# ---------------------------------------------------------------------------------------


@REGISTRY.message(30, min_fields=6)  # logprobs came later
@dataclass(frozen=True, slots=True, kw_only=True)
class Tokens:
    req_id: str
    instance_id: str  # sender; tells the gateway where the request runs now
    first_index: int  # output index of token_ids[0]
    token_ids: tuple[int, ...]  # new output tokens (may be empty with a finish_reason)
    finish_reason: str | None  # "length" | "stop" | "abort" | None
    attempt: int = 0  # Dispatch.attempt of the copy that made them
    # One per token of token_ids when the request asked for logprobs, else ().
    logprobs: tuple[TokenLogprobs, ...] = ()
    # Prompt tokens whose KV the request found cached (prefix cache or pulled blocks, not
    # computed) when it was first admitted. Set only with first_index == 0 (None otherwise,
    # and on an output before admission, such as an abort); the gateway keeps the first
    # value it gets, whatever migrations and replays follow.
    num_cached_prompt_tokens: Count | None = None


@REGISTRY.message(31)
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestError:
    req_id: str
    instance_id: str
    code: int  # 400 the request can't run (e.g. too long), 500 engine failure
    message: str
    attempt: int = 0  # Dispatch.attempt of the copy that failed


# ---------------------------------------------------------------------------------------
# worker -> scheduler
# ---------------------------------------------------------------------------------------


@REGISTRY.message(40, min_fields=8)  # kv_block_bytes came later
@dataclass(frozen=True, slots=True, kw_only=True)
class Register:
    instance_id: str
    inbox_addr: DialAddr  # advertised address of the worker's inbox
    num_blocks: int  # KV capacity in blocks
    block_size: int  # tokens per block
    max_model_len: int  # longest sequence the model accepts
    req_ids: tuple[str, ...]  # requests it holds now (non-empty after a scheduler restart)
    req_priorities: tuple[int, ...] = ()  # Priority of each of req_ids, same order
    prefix_seed: int = 0  # root of its prefix-cache hash chain; 0: it caches no prefix
    # What it serves (its --model-name; default the model's directory or preset name):
    # the model_name label of its metrics at the scheduler's /metrics.
    model_name: str = ""
    # Upper bounds of its queue-time histogram's buckets, seconds, increasing
    # (LoadReport.queue_time_counts); () when it keeps none.
    queue_time_bounds_s: tuple[float, ...] = ()
    kv_block_bytes: int = 0  # bytes of one KV block (what a copy of it moves); 0: unknown


@REGISTRY.struct
@dataclass(frozen=True, slots=True, kw_only=True)
class LoadFields:
    """What the global policy needs of one instance (DESIGN §5)."""

    num_total_blocks: int
    num_free_blocks: int  # free, and cached blocks nobody uses (reclaimable)
    num_reserved_blocks: int  # held for migrations coming in
    num_running: int
    num_waiting: int  # queued, not yet admitted (includes preempted)
    head_demand_blocks: int  # blocks the head-of-line waiting request needs; 0 if none
    waiting_demand_blocks: int  # blocks the whole queue needs to start
    used_blocks_high: int  # blocks held by high-priority requests
    num_running_high: int  # running high-priority requests
    num_migrations_in: int
    num_migrations_out: int
    draining: bool
    step_time_ewma_s: float  # EWMA of engine step time, seconds
    num_preemptions: int  # total since start
    num_cached_blocks: int = 0  # of num_free_blocks, those holding a cached prefix
    num_prompt_tokens: int = 0  # tokens of the requests admitted, total since start
    num_prefix_hit_tokens: int = 0  # of those, found in the prefix cache, total
    prefill_tokens_per_s: float = 0.0  # EWMA of its prefill throughput; 0: not measured
    # Prompt tokens still to prefill before a new request's turn: the waiting requests'
    # (less what they will find in the prefix cache) and the running ones' unfed chunks.
    pending_prefill_tokens: int = 0
    num_generation_tokens: int = 0  # output tokens sampled, total since start


@REGISTRY.message(41)
@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    instance_id: str
    inbox_addr: DialAddr  # lets a restarted scheduler ask an unknown instance to re-register
    seq: int  # report counter, increasing
    num_dispatch_received: int  # Dispatch messages seen so far: the scheduler counts the
    # load of later dispatches on top of this report
    load: LoadFields
    # Every request it holds, in every report_every-th report (about once a second), else
    # None: the scheduler reconciles its placement table with it (no phantom entries).
    req_ids: tuple[str, ...] | None = None
    # Prefix-cache events since the previous report, in order: block hashes cached and
    # evicted (a hash in both was cached, then evicted). With cache_snapshot (answering
    # CacheSnapshotRequest, or past MAX_CACHE_EVENTS) the full set of its cached hashes
    # instead, replacing what the scheduler knew.
    cache_stored: tuple[int, ...] = ()
    cache_evicted: tuple[int, ...] = ()
    cache_snapshot: tuple[int, ...] | None = None
    # Its requests' queue times (arrival at this worker to the first step that runs them)
    # since it started, cumulative: how many were <= each of Register.queue_time_bounds_s,
    # then how many in all; and their sum, seconds. () when it keeps none.
    queue_time_counts: tuple[int, ...] = ()
    queue_time_sum_s: float = 0.0


@REGISTRY.message(43)
@dataclass(frozen=True, slots=True, kw_only=True)
class Leaving:
    """Worker -> scheduler, when it is asked to stop (SIGTERM): with done=False (sent with
    every load report until it is empty) the scheduler drains it, migrating its requests
    away; with done=True, just before it exits, the scheduler forgets it at once (gateways
    replay anything it still held, without waiting for the heartbeat timeout)."""

    instance_id: str
    done: bool


@REGISTRY.message(42, min_fields=15)  # num_blocks_skipped came later
@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationDone:
    """Source -> scheduler, once per migration attempt, whatever its outcome."""

    migration_id: str
    req_id: str
    src_instance_id: str
    dst_instance_id: str
    committed: bool  # True: req_id now runs on dst
    reason: str  # why it aborted, "" when committed
    num_stages: int
    num_blocks: int  # KV blocks copied in all
    num_bytes: int
    total_s: float  # from MigrateOut to the end
    downtime_s: float  # paused time: end of the request's last step on src to the start of
    # its first step on dst (wall clocks of the two hosts; 0 for a queued request)
    first_stage_bytes: int = 0  # the bulk stage (all full blocks while decoding goes on)
    first_stage_s: float = 0.0  # its transfer time (gather + send), seconds
    kv_verified: bool = False  # committed with a KV checksum the destination matched
    token_gap_s: float = 0.0  # what the client sees: last token on src to first token on dst
    # Leading blocks not copied: the destination cached them already (MigPreallocReply).
    num_blocks_skipped: int = 0


@REGISTRY.message(44)
@dataclass(frozen=True, slots=True, kw_only=True)
class PullDone:
    """Destination -> scheduler, once per PullPrefix, whatever its outcome (the request was
    queued there either way)."""

    pull_id: str  # PullPrefix.pull_id
    req_id: str
    src_instance_id: str
    dst_instance_id: str
    ok: bool  # the blocks arrived and are cached at dst (False: the request recomputes them)
    reason: str  # why not, "" when ok
    num_blocks: int  # blocks copied
    num_cached_blocks: int  # of the blocks asked for, those dst cached already (not copied)
    num_bytes: int
    copy_s: float  # the transfer (receive) time, seconds
    total_s: float  # PullPrefix received -> request queued


# ---------------------------------------------------------------------------------------
# scheduler -> worker
# ---------------------------------------------------------------------------------------


@REGISTRY.message(50)
@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    req_id: str
    reason: str
    attempt: int | None = None  # abort only this Dispatch.attempt's copy; None: any copy


@REGISTRY.message(54)
@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayGone:
    """Scheduler -> every worker: a gateway died (silent past the scheduler's
    gateway_timeout_s) or restarted (a new req_id_prefix at its inbox). Nobody reads the
    output of its requests any more: drop each one whose reply_addr is inbox_addr and whose
    req_id starts with req_id_prefix, with no output, and free its KV."""

    inbox_addr: DialAddr
    req_id_prefix: str


@REGISTRY.message(55)
@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSnapshotRequest:
    """Scheduler -> worker: send the full set of your cached prefix hashes with the next
    load report (the scheduler's index of them may have missed events: a restart, a lost
    report)."""


@REGISTRY.message(51)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateOut:
    migration_id: str  # chosen by the scheduler, echoed in MigrationDone
    dst_instance_id: str
    dst_inbox_addr: DialAddr
    req_id: str | None  # None: the source picks (shortest running, low priority first)
    max_stages: int = -1  # stages before the pausing one; -1: the worker's limit, 0: stop-and-copy
    # Blocks the moved request may take at dst (the scheduler's view: its free blocks, less
    # the growth room periodic rebalancing keeps there); -1: unknown.
    dst_free_blocks: int = -1


@REGISTRY.message(56, body=DispatchBody)
@dataclass(frozen=True, slots=True, kw_only=True)
class PullPrefix:
    """Scheduler -> the instance chosen for a request (instead of forwarding its Dispatch):
    copy the request's first len(block_hashes) KV blocks from src, which caches them, into
    your prefix cache, then queue the request (where it finds them like any cache hit).
    If the copy fails (src evicted them, died, is too slow) the request is queued anyway
    and computes them. It carries the request's Dispatch whole (`dispatch`): the header
    fields after block_hashes, then its body, a frame forwarded unread. Build it with
    `PullPrefix.carrying`."""

    pull_id: str  # chosen by the scheduler, echoed in PullDone
    src_instance_id: str
    src_inbox_addr: DialAddr
    block_hashes: tuple[int, ...]  # prefix hashes of the blocks to copy: the request's first
    # The request's Dispatch, field for field (see Dispatch)
    req_id: str
    attempt: int
    priority: int
    reply_addr: DialAddr
    prompt_len: Count
    prefix_hashes: tuple[int, ...]
    body: bytes  # DispatchBody, encoded: a frame of its own

    @classmethod
    def carrying(cls, dispatch: Dispatch, *, pull_id: str, src_instance_id: str,
                 src_inbox_addr: str, block_hashes: tuple[int, ...]) -> PullPrefix:
        return cls(pull_id=pull_id, src_instance_id=src_instance_id,
                   src_inbox_addr=src_inbox_addr, block_hashes=block_hashes,
                   **{f.name: getattr(dispatch, f.name) for f in fields(Dispatch)})

    @property
    def dispatch(self) -> Dispatch:
        """The request's Dispatch, as the gateway sent it."""
        return Dispatch(**{f.name: getattr(self, f.name) for f in fields(Dispatch)})


@REGISTRY.message(52)
@dataclass(frozen=True, slots=True, kw_only=True)
class SetDraining:
    draining: bool  # True: take no new work, let the scheduler migrate everything away


@REGISTRY.message(53)
@dataclass(frozen=True, slots=True, kw_only=True)
class ReRegister:
    """A restarted scheduler heard from an instance it does not know."""

    scheduler_epoch: str


# ---------------------------------------------------------------------------------------
# worker <-> worker: live migration control (DESIGN §6). KV data travels over
# torch.distributed, never here.
# ---------------------------------------------------------------------------------------


@REGISTRY.message(60, min_fields=8)  # block_hashes came later
@dataclass(frozen=True, slots=True, kw_only=True)
class MigPrealloc:
    migration_id: str
    req_id: str
    src_instance_id: str
    src_inbox_addr: DialAddr  # where the destination answers
    num_blocks: int  # blocks to reserve now (the request's current blocks + growth)
    kv_block_bytes: int  # bytes of one KV block; the peers must agree
    group_id: str | None  # pairwise KV group the source already shares with dst, if any
    prompt_token_ids: tuple[int, ...] = ()  # the request's prompt (sent once, early)
    # Prefix hashes (common/prefix_hash.py) of the request's full blocks whose KV the source
    # has computed, in block order: the destination claims the leading ones it caches and
    # the source sends only the rest. (): the source caches no prefixes.
    block_hashes: tuple[int, ...] = ()


@REGISTRY.message(72)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigPreallocReply:
    migration_id: str
    ok: bool
    reason: str  # why not, when ok is False
    group_id: str  # pairwise KV group to use
    store_addr: HostPortOrEmpty  # "host:port" of the group's rendezvous store (dst hosts it)
    # Leading blocks of MigPrealloc.block_hashes the destination holds already (claimed
    # for the request: the source skips them; the block table there starts with them).
    num_cached_blocks: int = 0


@REGISTRY.message(62)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigStage:
    """The source is about to send blocks [first_block_index, +num_blocks) of the request's
    block table over the KV group; the destination posts matching receives."""

    migration_id: str
    stage_index: int  # 0, 1, ...
    first_block_index: int  # logical index in the request's block table (never below the
    # destination's MigPreallocReply.num_cached_blocks)
    num_blocks: int
    num_blocks_needed: int  # blocks the request needs in all by now, cached ones included
    # (dst grows its reservation)


@REGISTRY.message(63)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigStageAck:
    migration_id: str
    stage_index: int
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestState:
    """What a request needs to resume elsewhere, besides its prompt (which never changes
    and travels earlier, with MigPrealloc, outside the paused window)."""

    req_id: str
    output_token_ids: tuple[int, ...]  # generated so far (including replayed ones)
    num_delivered: int  # output tokens already sent to the gateway
    sampling: SamplingParams
    priority: int
    reply_addr: DialAddr
    arrival_s: float
    num_computed_tokens: int  # tokens whose KV the destination now holds
    num_preemptions: int
    attempt: int = 0  # Dispatch.attempt of this copy (its Tokens carry it on)
    # Its first admission's count (Tokens.num_cached_prompt_tokens), while the gateway has
    # not been told it (no output delivered yet); else None.
    num_cached_prompt_tokens: Count | None = None


REGISTRY.struct(RequestState, min_fields=10)  # num_cached_prompt_tokens came later


@REGISTRY.message(64)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigCommit:
    migration_id: str
    state: RequestState
    kv_checksum: int | None = None  # verify mode: exact sum of the KV blocks' bit patterns


@REGISTRY.message(65)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigCommitAck:
    migration_id: str
    ok: bool
    reason: str
    resumed_s: float = 0.0  # wall clock (time.time()) when the request's first step here began
    first_token_s: float = 0.0  # wall clock when that step ended (its next token exists)


@REGISTRY.message(66)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigAbort:
    migration_id: str
    reason: str


# ---------------------------------------------------------------------------------------
# worker <-> worker: prefix pulls (DESIGN §6). The destination D asks, the source S sends
# over the same pairwise KV group (S -> D) as migrations:
#   D -> S PrefixFetch;  S -> D PrefixOffer (blocks pinned);  D -> S PrefixAccept (group);
#   S -> D PrefixSend, then the blocks;  PullAbort either way at any point.
# ---------------------------------------------------------------------------------------


@REGISTRY.message(67)
@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixFetch:
    pull_id: str
    dst_instance_id: str
    dst_inbox_addr: DialAddr  # where the source answers
    block_hashes: tuple[int, ...]  # the prefix's block hashes from its first block
    first_block: int  # send blocks [first_block, len(block_hashes)): dst has the ones before
    kv_block_bytes: int  # bytes of one KV block at dst; the peers must agree


@REGISTRY.message(68)
@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixOffer:
    pull_id: str
    num_blocks: int  # blocks [first_block, first_block + num_blocks) pinned for dst; 0: none
    reason: str  # why none (or fewer), else ""
    group_id: str | None  # pairwise KV group S -> D the source already has, if any


@REGISTRY.message(69)
@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixAccept:
    pull_id: str
    group_id: str  # pairwise KV group to use (as MigPreallocReply)
    store_addr: HostPortOrEmpty  # its rendezvous store when new, else ""


@REGISTRY.message(70)
@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixSend:
    """The source is about to send the offered blocks over the group; dst posts the
    receives."""

    pull_id: str
    num_blocks: int


@REGISTRY.message(71)
@dataclass(frozen=True, slots=True, kw_only=True)
class PullAbort:
    pull_id: str
    reason: str


# ---------------------------------------------------------------------------------------
# admin: ferry CLI <-> scheduler.admin (request/reply)
# ---------------------------------------------------------------------------------------


@REGISTRY.message(80)
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest:
    pass


@REGISTRY.struct
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceStatus:
    instance_id: str
    inbox_addr: DialAddr
    alive: bool
    load: LoadFields
    freeness: float  # the policy's F (DESIGN §5); inf encoded as a large number
    last_report_age_s: float


@REGISTRY.struct
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestPlacement:
    req_id: str
    instance_id: str
    priority: int


@REGISTRY.message(81, min_fields=8)  # the pull counters came later
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply:
    scheduler_epoch: str
    dispatch_policy: str
    instances: tuple[InstanceStatus, ...]
    requests: tuple[RequestPlacement, ...]
    num_migrations_committed: int
    num_migrations_aborted: int
    abort_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count
    num_pending: int = 0  # requests held in the scheduler's pending queue
    num_pulls: int = 0  # prefix pulls decided (PullPrefix sent)
    num_pulls_ok: int = 0  # PullDone ok: the blocks were copied
    num_pulls_failed: int = 0  # PullDone not ok: the request recomputed the prefix
    num_pull_blocks: int = 0  # KV blocks copied by pulls
    pull_fail_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count


@REGISTRY.message(82)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateCommand:
    req_id: str
    dst_instance_id: str
    timeout_s: float  # how long the CLI waits for the outcome


@REGISTRY.message(83)
@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateCommandReply:
    ok: bool
    reason: str  # why it failed or aborted
    done: MigrationDone | None  # the outcome's details when the migration ran


@REGISTRY.message(84)
@dataclass(frozen=True, slots=True, kw_only=True)
class AdminError:
    code: int
    message: str


@REGISTRY.message(85)
@dataclass(frozen=True, slots=True, kw_only=True)
class DrainCommand:
    """`ferry drain INSTANCE`: take no new requests there and migrate every request it
    holds (running and queued) to the other instances; the reply comes when none is left
    or at the timeout. cancel: take requests again (after a drain)."""

    instance_id: str
    timeout_s: float  # how long the CLI waits for the instance to be empty
    cancel: bool = False


@REGISTRY.message(86)
@dataclass(frozen=True, slots=True, kw_only=True)
class DrainReply:
    ok: bool  # drained (or, with cancel, serving again)
    reason: str  # why not, else ""
    num_left: int  # requests it still holds

