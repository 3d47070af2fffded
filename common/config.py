"""Frozen configuration of each service. Built once at start-up from CLI flags with
`common.env` defaults; per-instance copies via dataclasses.replace. Derived values are
properties; nothing mutates a config after it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ferry.common import env

# Blocks of decode growth a migrated request is given at its destination: the migration
# reserves its tokens plus this many blocks there (services/worker/migration/machine.py),
# the source picks a request that fits with this much left (choice.py), and the scheduler
# keeps this many per running request free at a destination (migrate_dst_growth_blocks).
MIGRATION_GROWTH_BLOCKS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A ZMQ endpoint in its two forms: what this process binds, and what peers dial.
    They differ when services sit on different hosts or in containers."""

    bind: str  # e.g. tcp://0.0.0.0:5600
    advertise: str  # e.g. tcp://scheduler:5600

    @classmethod
    def on_port(cls, port: int) -> Endpoint:
        return cls(bind=f"tcp://{env.bind_host()}:{port}", advertise=f"tcp://{env.host()}:{port}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    gateway_id: str  # unique per gateway; prefixes its req_ids
    http_host: str  # HTTP bind interface
    http_port: int  # OpenAI-compatible API
    sdk: Endpoint  # ROUTER for the ferry SDK
    inbox: Endpoint  # PULL for Tokens and scheduler messages
    scheduler_addr: str  # scheduler inbox
    model: str  # model directory (for the tokenizer and /v1/models)
    model_name: str  # name reported by /v1/models
    api_keys: tuple[str, ...] = ()  # empty: no auth
    max_inflight: int = 1024  # requests in flight; beyond that 429
    max_queued_chunks: int = 256  # per-request buffered token chunks for a slow client
    default_timeout_s: float = 600.0  # per-request deadline unless the request says
    max_tokens_limit: int = 32768  # largest max_tokens accepted
    bypass_after_s: float = 3.0  # no InstanceView for this long: dispatch straight to workers
    max_frame_bytes: int = field(default_factory=env.max_frame_bytes)  # also caps HTTP bodies
    # --- input hygiene (DESIGN §7) ---
    num_tokenizer_threads: int = 2  # threads parsing large bodies and tokenizing long prompts
    max_tokenizer_queue: int = 64  # requests waiting for those threads; beyond that 429
    http_idle_timeout_s: float = 30.0  # an HTTP connection silent this long is closed
    max_http_connections: int = 4096  # open HTTP connections; more are refused (429)
    keys_dir: str = field(default_factory=env.keys_dir)  # CURVE keys; "": plain sockets
    key_name: str = field(default_factory=env.key_name)  # identity; "": "gateway"


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    inbox: Endpoint  # PULL: dispatches, releases, reports
    admin: Endpoint  # ROUTER: ferry status / migrate
    dispatch_policy: str = "llumnix"  # round_robin | least_load | llumnix
    heartbeat_timeout_s: float = 2.0  # silence past this marks an instance dead
    view_interval_s: float = 1.0  # InstanceView to gateways
    # After a start, no InstanceView for this long (workers re-register meanwhile), so a
    # restarted scheduler's empty table never replaces the gateways' view of the instances.
    startup_grace_s: float = 2.0
    # A gateway silent this long (its GatewayHello comes every second) is gone: workers
    # drop its requests, whose output nobody reads any more.
    gateway_timeout_s: float = 10.0
    # --- migration (DESIGN §5) ---
    enable_migration: bool = True
    migration_interval_s: float = 0.2  # how often pairs are formed
    migrate_out_threshold: float = 1.0  # freeness below this makes a migration source
    # Blocks per running request a destination keeps free after taking a migrated one:
    # its batch's next 64 decode steps (block size 16), so a move cannot preempt there.
    migrate_dst_growth_blocks: int = MIGRATION_GROWTH_BLOCKS
    max_migrations_per_instance: int = 2  # concurrent migrations in or out of one instance
    # Freeness a destination must exceed the source (and the threshold) by to be paired;
    # None: max(1, migrate_out_threshold).
    migrate_margin: float | None = None
    high_priority_headroom_blocks: int = 0  # virtual usage added per high-priority request
    # An instance whose estimated queue reaches this takes no dispatch (all full: 429).
    max_queued_per_instance: int = 4096
    # --- prefix pulls (ferry; DESIGN §6) ---
    prefix_pull: bool = True  # a free instance may copy a busy one's cached prefix
    # The KV copy rate between instances the pull decision assumes, bytes/s: ~200e9 over
    # NVLink (NCCL, 256 MiB chunks), far less between hosts or over gloo on CPU.
    kv_bandwidth_bytes_s: float = 2e9
    # --- pending queue (services/scheduler/pending.py) ---
    hold_until_room: bool = True  # hold requests no instance has room for, here
    max_pending: int = 4096  # held requests at most; past it dispatch answers 429
    pending_window: int = 64  # held requests a release scans (first fit)
    pending_max_wait_s: float = 5.0  # held this long: dispatched regardless of room
    # --- scaling ---
    autoscale: bool = False
    min_workers: int = 1
    max_workers: int = 1
    scale_up_freeness: float = 10.0  # average F below this for `scale_cooldown_s`: add one
    scale_down_freeness: float = 60.0  # average F above this: drain one
    scale_cooldown_s: float = 10.0
    max_frame_bytes: int = field(default_factory=env.max_frame_bytes)
    keys_dir: str = field(default_factory=env.keys_dir)  # CURVE keys; "": plain sockets
    key_name: str = field(default_factory=env.key_name)  # identity; "": "scheduler"


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """The engine core's knobs (pure; no processes)."""

    max_num_seqs: int = 256  # requests in one batch at most
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    max_waiting: int = 4096  # queue bound; beyond it new requests are refused
    admission_watermark: float = 0.01  # fraction of blocks kept free when admitting
    # Keep full blocks findable by their prefix hash; a request skips the prefill of its
    # cached prefix (block_manager.py). `--no-prefix-cache` turns it off.
    enable_prefix_cache: bool = True


DEFAULT_BLOCK_SIZE = 16  # tokens per KV block, unless a worker is configured otherwise


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    instance_id: str
    inbox: Endpoint  # PULL: scheduler, gateways (bypass), peers (migration)
    scheduler_addr: str
    model: str  # model directory or "tiny"
    # The model_name label of its metrics (the scheduler's /metrics); like the gateway's
    # --model-name, by default the model's directory name or preset name.
    model_name: str = ""
    device: str = "cpu"  # cpu | cuda | cuda:N
    executor: str = "model"  # model | sim
    sim_profile: str = ""  # profile JSON for the sim executor
    attention_backend: str = "auto"  # torch | triton | flash | auto
    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int = 0  # 0: derive from kv_cache_gb / free memory
    kv_cache_gb: float = field(default_factory=env.kv_cache_gb)
    engine: EngineConfig = field(default_factory=EngineConfig)
    report_interval_s: float = field(default_factory=env.report_interval_s)
    max_migrations: int = 2  # concurrent migrations in or out of this instance
    migration_stage_limit: int = 8  # stages before the final (pausing) one
    migration_last_stage_blocks: int = 2  # few enough blocks left: pause and finish
    migration_timeout_s: float = 30.0  # a migration with no progress for this long aborts
    migration_chunk_bytes: int = 256 * 1024 * 1024  # one send (NCCL peaks at >= 256 MiB)
    migration_verify_kv: bool = False  # checksum the KV at commit (costs a read of it)
    # Prefix pulls (PullPrefix; services/worker/migration/prefix_pull.py): at most this many
    # in (and out) at once; each wait for the peer bounded by the timeout, after which the
    # request is queued without the copy (it computes the prefix).
    max_prefix_pulls: int = 4
    prefix_pull_timeout_s: float = 2.0
    # SIGTERM: requests migrate away for at most this long before the worker exits (what
    # is still here then is replayed by the gateways); keep it below the supervisor's stop
    # timeout (compose stop_grace_period, systemd TimeoutStopSec).
    drain_timeout_s: float = 25.0
    step_log: str = ""  # a file to append every step's features and time to (sim_check)
    grammar_threads: int = 0  # llguidance's mask threads; 0: half the cores, at most 4
    max_frame_bytes: int = field(default_factory=env.max_frame_bytes)
    keys_dir: str = field(default_factory=env.keys_dir)  # CURVE keys; "": plain sockets
    key_name: str = field(default_factory=env.key_name)  # identity; "": "worker"


def defaults(config_class: type) -> dict[str, Any]:
    """Field name -> default of a config dataclass (factories called now: env-derived
    defaults read the environment at this moment). Command lines take their defaults
    from here, so a default lives only on its dataclass."""
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
