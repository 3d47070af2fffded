"""build_engine: what a `ferry worker` command line turns into."""

from __future__ import annotations

import argparse

from ferry.services.worker.entry import add_arguments, build_engine, config_from_args


def _config(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_random_preset_worker_takes_structured_output(tmp_path, monkeypatch):
    """random:PRESET draws weights in memory, but its directory has the preset's
    tokenizer, so json_schema requests are served, not refused."""
    monkeypatch.setenv("FERRY_MODEL_CACHE", str(tmp_path))
    engine = build_engine(_config("--model", "random:tiny", "--device", "cpu",
                                  "--kv-cache-gb", "0.05"))
    assert engine.executor.supports_grammar
    assert engine.executor.config.model_dir is None  # weights in memory, none read


def test_step_log_path_takes_the_worker_id():
    """One --worker-arg=--step-log for every worker of a cluster: a file each."""
    named = _config("--instance-id", "worker-3", "--step-log", "/logs/steps-{instance_id}.jsonl")
    assert named.step_log == "/logs/steps-worker-3.jsonl"
    unnamed = _config("--port", "7001", "--step-log", "steps-{instance_id}.jsonl")
    assert unnamed.step_log.endswith("-7001.jsonl") and "{" not in unnamed.step_log
    assert _config("--step-log", "plain.jsonl").step_log == "plain.jsonl"
