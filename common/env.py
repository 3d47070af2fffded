"""Every environment variable Ferry reads, in one place. All carry the FERRY_ prefix.

Precedence everywhere: command-line flag > environment variable > built-in default.
`common/config.py` consumes these as defaults; nothing else calls os.environ for Ferry
settings.
"""

from __future__ import annotations

import os


def _str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _list(name: str) -> tuple[str, ...]:
    raw = os.environ.get(name, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def host() -> str:
    # Address other hosts use to reach this one; advertised in every bound endpoint.
    return _str("FERRY_HOST", "127.0.0.1")


def bind_host() -> str:
    # Interface services bind on (0.0.0.0 in containers).
    return _str("FERRY_BIND_HOST", "127.0.0.1")


def scheduler_addr() -> str:
    # The scheduler's inbox as seen by gateways and workers, e.g. tcp://sched:5600.
    return _str("FERRY_SCHEDULER_ADDR", "tcp://127.0.0.1:5600")


def scheduler_admin_addr() -> str:
    # The scheduler's admin endpoint (ferry status / migrate).
    return _str("FERRY_SCHEDULER_ADMIN_ADDR", "tcp://127.0.0.1:5601")


def gateway_sdk_addr() -> str:
    # The gateway's SDK endpoint, as clients see it.
    return _str("FERRY_GATEWAY_ADDR", "tcp://127.0.0.1:8001")


def api_keys() -> tuple[str, ...]:
    # Comma-separated API keys; empty means no authentication.
    return _list("FERRY_API_KEYS")


def api_key() -> str | None:
    # The key the SDK and CLI send, if any.
    return os.environ.get("FERRY_API_KEY") or None


def model() -> str:
    # Model directory, or "tiny" (Ferry makes it under FERRY_MODEL_CACHE).
    return _str("FERRY_MODEL", "tiny")


def model_cache() -> str:
    # Where generated models (tiny and presets) are written.
    return _str("FERRY_MODEL_CACHE", os.path.expanduser("~/.cache/ferry/models"))


def device() -> str:
    # "cpu", "cuda" or "auto" (cuda when available).
    return _str("FERRY_DEVICE", "auto")


def executor() -> str:
    # "model" (real weights) or "sim" (latency model from a profile).
    return _str("FERRY_EXECUTOR", "model")


def instance_id() -> str:
    # A worker's id; default derived from host and port.
    return _str("FERRY_INSTANCE_ID", "")


def log_level() -> str:
    # debug | info | warning | error
    return _str("FERRY_LOG_LEVEL", "info")


def log_format() -> str:
    # "json" (default, one object a line) or "console" (human-friendly).
    return _str("FERRY_LOG_FORMAT", "json")


def max_frame_bytes() -> int:
    # Largest message body any socket accepts.
    return _int("FERRY_MAX_FRAME_BYTES", 16 * 1024 * 1024)


def report_interval_s() -> float:
    # How often workers report load to the scheduler.
    return _float("FERRY_REPORT_INTERVAL_S", 0.05)


def kv_cache_gb() -> float:
    # KV cache size in GiB; 0 means the worker picks (fraction of free memory on GPU).
    return _float("FERRY_KV_CACHE_GB", 0.0)


def torch_threads() -> int:
    # CPU threads torch may use in a worker; 0 means half the cores (a local cluster
    # shares the machine).
    return _int("FERRY_TORCH_THREADS", 0)


def keys_dir() -> str:
    # Directory of the cluster's CURVE keys (`ferry keys init`); empty: internal sockets
    # are plain and accept any sender (loopback only!).
    return _str("FERRY_KEYS_DIR", "")


def key_name() -> str:
    # This process's identity in FERRY_KEYS_DIR (NAME.key_secret); empty: its role's name
    # ("scheduler", "gateway", "worker", "admin").
    return _str("FERRY_KEY_NAME", "")
