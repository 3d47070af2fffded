"""A cluster with keys, as an operator runs one: `ferry keys init`, then `ferry up` with
FERRY_KEYS_DIR: it serves, the admin commands work with the admin key, and without the
keys nothing inside answers (the admin port stays silent)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ferry import Client
from ferry.bench.local_cluster import start_cluster

pytestmark = pytest.mark.e2e


def test_a_keyed_cluster_serves_and_answers_only_the_admin_key(tmp_path):
    keys_dir = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "ferry.services.cli", "keys", "init",
                           str(keys_dir)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    cluster = start_cluster(tmp_path / "up", workers=2,
                            model_cache=str(tmp_path.parent / "models"),
                            env={"FERRY_KEYS_DIR": str(keys_dir)})
    try:
        assert cluster.ready["internal_sockets"] == "curve"
        with Client(cluster.sdk_addr) as client:
            out = client.generate("Hello", max_tokens=6, ignore_eos=True)
            assert len(out.token_ids) == 6
        status = cluster.status()
        assert sorted(i["instance_id"] for i in status["instances"]) == ["worker-0", "worker-1"]
        assert '"internal_sockets": "curve"' in (cluster.log_dir / "scheduler.log").read_text()
        # the same command without the keys: the scheduler never answers it
        keyless = subprocess.run(
            [sys.executable, "-m", "ferry.services.cli", "status", "--admin-addr",
             cluster.admin_addr, "--timeout", "1", "--keys-dir", ""],
            capture_output=True, text=True, timeout=60)
        assert keyless.returncode == 1 and "no answer" in keyless.stderr
    except Exception:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
