"""Turn a --model argument into a model directory.

A path is used as it is. A preset name ("tiny", "llama2-7b", "llama3-8b") means a
random-weight model Ferry makes itself under FERRY_MODEL_CACHE/<preset>: the first
process to need it makes it under a file lock, writing into a temporary directory that
is renamed into place when complete, so other processes never see half a model.
"random:PRESET" resolves to a directory with the preset's config and tokenizer but no
weights (FERRY_MODEL_CACHE/random-<preset>): what a gateway reads; workers given
"random:PRESET" draw the weights on their device instead.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from pathlib import Path

from ferry.common import env

PRESET_NAMES = ("tiny", "llama2-7b", "llama3-8b")
# "random:PRESET" names a preset's shape with random weights made in memory, no files.
RANDOM_PREFIX = "random:"
# Marker written last into a complete model directory.
COMPLETE_MARKER = ".ferry-complete"


def is_preset(name: str) -> bool:
    return name in PRESET_NAMES


def preset_config(name: str):
    """The ModelConfig of "random:PRESET" (or of a bare preset name)."""
    from ferry.services.worker.model.make_model import PRESETS

    preset = name.removeprefix(RANDOM_PREFIX)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset].config


def preset_dir(name: str) -> Path:
    return Path(env.model_cache()) / name


def resolve_model(name: str, *, create: bool = True, wait_s: float = 0.0) -> Path:
    """The directory of model `name`. For a preset: make it if `create`, else wait up to
    wait_s for another process to finish making it."""
    text_only = name.startswith(RANDOM_PREFIX)
    if text_only:
        preset_config(name)  # an unknown preset: a clear error
    elif not is_preset(name):
        path = Path(name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name}: not a model directory (no config.json) and not "
                                    f"one of the presets {', '.join(PRESET_NAMES)}")
        return path
    preset = name.removeprefix(RANDOM_PREFIX)
    name = f"random-{preset}" if text_only else name
    target = preset_dir(name)
    if (target / COMPLETE_MARKER).exists():
        return target
    if not create:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if (target / COMPLETE_MARKER).exists():
                return target
            time.sleep(0.2)
        raise FileNotFoundError(f"model {name!r} is not made yet under {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target
        from ferry.services.worker.model.make_model import make_model  # torch: only when making

        partial = target.parent / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        make_model(preset, partial, weights=not text_only)
        (partial / COMPLETE_MARKER).write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target
