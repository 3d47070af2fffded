"""The local-process provisioner, with a stand-in for `python -m ferry.services.worker`."""

from __future__ import annotations

import json
import sys
import time

import pytest

from ferry.services.scheduler.provisioner import LocalProcessProvisioner

# Writes its argv to the file named by its first argument, then waits to be stopped.
# With "--ignore-term" it ignores SIGINT, the provisioner's stop (to exercise SIGKILL).
FAKE_WORKER = """
import json, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # like the worker: stop at once
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
with open(sys.argv[1], "w") as f:
    json.dump(sys.argv[2:], f)
while True:
    time.sleep(0.05)
"""


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def provisioner_for(tmp_path):
    made = []

    def make(extra=""):
        argv_file = tmp_path / "argv.json"
        template = f"{argv_file} --instance-id {{instance_id}} --port {{port}} --scheduler-addr {{scheduler_addr}} {extra}"
        p = LocalProcessProvisioner(
            template,
            scheduler_addr="tcp://sched:5600",
            instance_prefix="t",
            command=(sys.executable, "-c", FAKE_WORKER),
        )
        made.append(p)
        return p, argv_file

    yield make
    for p in made:
        p.close(timeout_s=2.0)


def test_start_fills_the_template_and_stop_terminates(provisioner_for):
    provisioner, argv_file = provisioner_for()
    handle = provisioner.start_worker()
    assert handle.instance_id.startswith("t-")
    wait_for(argv_file.exists)
    wait_for(lambda: argv_file.read_text().endswith("]"))
    argv = json.loads(argv_file.read_text())
    assert argv[:2] == ["--instance-id", handle.instance_id]
    assert argv[2] == "--port" and 1024 <= int(argv[3]) <= 65535
    assert argv[4:] == ["--scheduler-addr", "tcp://sched:5600"]
    assert provisioner.reap() == []
    provisioner.stop_worker(handle.instance_id)
    exited = []
    wait_for(lambda: exited.extend(provisioner.reap()) or exited)
    assert exited == [handle.instance_id]
    assert provisioner.procs == {}


def test_ids_are_unique(provisioner_for):
    provisioner, _ = provisioner_for()
    ids = {provisioner.start_worker().instance_id for _ in range(3)}
    assert len(ids) == 3


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(provisioner_for):
    provisioner, argv_file = provisioner_for("--ignore-term")
    handle = provisioner.start_worker()
    wait_for(argv_file.exists)  # its SIGINT handler is installed by now
    provisioner.stop_worker(handle.instance_id, now=0.0)
    time.sleep(0.2)
    assert provisioner.reap(now=1.0) == []  # within the grace: still there
    provisioner.reap(now=1e9)  # past it: SIGKILL
    exited = []
    wait_for(lambda: exited.extend(provisioner.reap(now=1e9)) or exited)
    assert exited == [handle.instance_id]


def test_crashed_workers_are_reaped(provisioner_for):
    provisioner, argv_file = provisioner_for()
    handle = provisioner.start_worker()
    wait_for(argv_file.exists)
    provisioner.procs[handle.instance_id].kill()
    exited = []
    wait_for(lambda: exited.extend(provisioner.reap()) or exited)
    assert exited == [handle.instance_id]


def test_close_stops_everything(provisioner_for):
    provisioner, _ = provisioner_for()
    procs = [provisioner.procs[provisioner.start_worker().instance_id] for _ in range(2)]
    provisioner.close(timeout_s=5.0)
    assert all(p.poll() is not None for p in procs)
    assert provisioner.procs == {}
