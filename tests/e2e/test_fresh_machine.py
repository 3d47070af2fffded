"""Ferry as a new user runs it: the installed `ferry` console script, from a directory
outside the repository (no repository folder on sys.path to hide a packaging mistake):
help, make-model, generate, then `ferry up` serving the official openai client and the SDK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferry.bench.local_cluster import REPO, pid_alive, start_cluster

pytestmark = pytest.mark.e2e

FERRY = Path(sys.executable).parent / "ferry"  # the console script pip installed


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    if not FERRY.exists():
        pytest.skip(f"no console script at {FERRY}: run the tests from the make setup venv")
    where = tmp_path_factory.mktemp("user-home")
    assert REPO not in where.parents
    return where


def ferry(cwd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # A clean environment a user would have: no PYTHONPATH pointing into the repository.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FERRY_MODEL_CACHE"] = str(cwd / "models")
    return subprocess.run([str(FERRY), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_console_script_help_make_model_generate(outside):
    out = ferry(outside, "--help")
    assert out.returncode == 0 and "make-model" in out.stderr, out.stderr
    out = ferry(outside, "make-model", "--help")
    assert out.returncode == 0 and "--preset" in out.stdout, out.stderr
    out = ferry(outside, "make-model", "--preset", "tiny", "--out", "tiny-model")
    assert out.returncode == 0, out.stderr
    assert (outside / "tiny-model" / "config.json").is_file()
    out = ferry(outside, "generate", "--model", "tiny-model", "--prompt", "def add(",
                "--max-tokens", "5", "--ignore-eos", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert len(json.loads(line)["token_ids"]) == 5


def test_ferry_up_serves_openai_and_sdk_clients(outside):
    from openai import OpenAI

    from ferry import Client

    env_cache = str(outside / "models")
    cluster = start_cluster(outside / "up", workers=1, model_cache=env_cache,
                            launcher=(str(FERRY),), cwd=outside)
    try:
        oai = OpenAI(base_url=cluster.base_url + "/v1", api_key="unused")
        completion = oai.completions.create(model="tiny", prompt="Hello", max_tokens=6,
                                            extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 6
        chat = oai.chat.completions.create(model="tiny", max_tokens=4, stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
        assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in chat)
        with Client(cluster.sdk_addr) as client:
            out = client.generate("Hello", max_tokens=5, ignore_eos=True, seed=1)
            assert len(out.token_ids) == 5 and out.finish_reason == "length"
    except Exception:
        print(cluster.logs())
        raise
    finally:
        pids = cluster.ready["pids"]
        cluster.stop()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
