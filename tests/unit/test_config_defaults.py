"""A command line's defaults are its config dataclass's: no flag repeats a default."""

from __future__ import annotations

import argparse
import dataclasses

from ferry.common.config import EngineConfig, SchedulerConfig, WorkerConfig, defaults
from ferry.services.scheduler import entry as scheduler_entry
from ferry.services.worker import entry as worker_entry


def test_defaults_reads_plain_defaults_and_factories(monkeypatch):
    monkeypatch.setenv("FERRY_REPORT_INTERVAL_S", "0.125")
    d = defaults(WorkerConfig)
    assert d["max_migrations"] == WorkerConfig.__dataclass_fields__["max_migrations"].default
    assert d["report_interval_s"] == 0.125  # a factory, read now
    assert "instance_id" not in d  # no default: the caller must give it


def test_a_worker_started_with_no_flags_gets_the_config_defaults():
    parser = argparse.ArgumentParser()
    worker_entry.add_arguments(parser)
    config = worker_entry.config_from_args(parser.parse_args(["--device", "cpu"]))
    reference = WorkerConfig(instance_id=config.instance_id, inbox=config.inbox,
                             scheduler_addr=config.scheduler_addr, model=config.model,
                             model_name=config.model_name, device="cpu")
    assert config == reference
    assert config.engine == EngineConfig()


def test_a_scheduler_started_with_no_flags_gets_the_config_defaults():
    parser = argparse.ArgumentParser()
    scheduler_entry.add_arguments(parser)
    args = parser.parse_args([])
    for f in dataclasses.fields(SchedulerConfig):
        if f.default is not dataclasses.MISSING and hasattr(args, f.name):
            assert getattr(args, f.name) == f.default, f.name
