"""The offline commands users run: ferry make-model, ferry generate, and ferry status
without a scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ferry.bench.local_cluster import REPO

pytestmark = pytest.mark.e2e


def ferry(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ferry.services.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def test_make_model_then_generate_json(tmp_path):
    model = tmp_path / "tiny"
    made = ferry("make-model", "--preset", "tiny", "--out", str(model))
    assert made.returncode == 0, made.stderr
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    args = ("generate", "--model", str(model), "--prompt", "Hello there", "--prompt-ids",
            "5,6,7", "--max-tokens", "6", "--ignore-eos", "--device", "cpu", "--json")
    first = ferry(*args, "--temperature", "0.8", "--seed", "3")
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[1]["prompt_token_ids"] == [5, 6, 7]
    assert all(len(line["token_ids"]) == 6 and isinstance(line["text"], str) for line in lines)
    again = ferry(*args, "--temperature", "0.8", "--seed", "3")
    assert again.stdout == first.stdout  # seeded sampling is reproducible


def test_generate_rejects_bad_input_clearly(tmp_path):
    out = ferry("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 2 and "not a model directory" in out.stderr
    assert "Traceback" not in out.stderr
    out = ferry("generate", "--prompt-ids", "1,x")
    assert out.returncode == 2 and "comma-separated integers" in out.stderr


def test_status_without_scheduler_fails_with_a_reason():
    out = ferry("status", "--admin-addr", "tcp://127.0.0.1:9", "--timeout", "0.5")
    assert out.returncode == 1 and "is the scheduler running" in out.stderr
