"""`ferry worker`: flags -> WorkerConfig -> executor -> engine -> the worker process."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path

from ferry.common import env
from ferry.common.config import Endpoint, EngineConfig, WorkerConfig, defaults
from ferry.common.logging import configure, get_logger
from ferry.services.worker.engine.engine import Engine

# KV cache on CPU when nothing says otherwise: small models, small machines.
DEFAULT_CPU_KV_GB = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for WorkerConfig; every default is the dataclass's (`defaults`)."""
    w, e = defaults(WorkerConfig), defaults(EngineConfig)
    parser.add_argument("--instance-id", default=env.instance_id(),
                        help="unique id (default: <host>-<port>)")
    parser.add_argument("--port", type=int, default=5700, help="inbox port")
    parser.add_argument("--inbox-bind", default="", help="bind address (default tcp://BIND_HOST:PORT)")
    parser.add_argument("--inbox-advertise", default="",
                        help="address peers dial (default tcp://FERRY_HOST:PORT)")
    parser.add_argument("--scheduler-addr", default=env.scheduler_addr())
    parser.add_argument("--model", default=env.model(), help="model directory or preset name")
    parser.add_argument("--model-name", default="",
                        help="model_name label of its metrics (default: the model's directory "
                             "or preset name, as the gateway's --model-name)")
    parser.add_argument("--device", default=env.device(), help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--executor", default=env.executor(), choices=["model", "sim"])
    parser.add_argument("--sim-profile", default="", help="profile JSON (executor sim)")
    parser.add_argument("--sim-speedup", type=float, default=1.0,
                        help="run the sim clock this many times faster than real time")
    parser.add_argument("--attention-backend", default="auto",
                        choices=["auto", "torch", "triton", "flash"])
    parser.add_argument("--block-size", type=int, default=w["block_size"])
    parser.add_argument("--num-blocks", type=int, default=w["num_blocks"], help="KV blocks (0: from --kv-cache-gb)")
    parser.add_argument("--kv-cache-gb", type=float, default=w["kv_cache_gb"],
                        help="KV cache GiB (0: a fraction of free GPU memory; 0.25 on CPU)")
    parser.add_argument("--max-num-seqs", type=int, default=e["max_num_seqs"])
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=e["max_num_batched_tokens"])
    parser.add_argument("--max-waiting", type=int, default=e["max_waiting"])
    parser.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction,
                        default=e["enable_prefix_cache"],
                        help="keep computed prefixes and reuse them (--no-prefix-cache: off)")
    parser.add_argument("--report-interval", type=float, default=w["report_interval_s"])
    parser.add_argument("--max-migrations", type=int, default=w["max_migrations"],
                        help="concurrent migrations in (and out) of this instance")
    parser.add_argument("--migration-stage-limit", type=int,
                        default=w["migration_stage_limit"])
    parser.add_argument("--migration-last-stage-blocks", type=int,
                        default=w["migration_last_stage_blocks"])
    parser.add_argument("--migration-timeout", type=float, default=w["migration_timeout_s"])
    parser.add_argument("--migration-chunk-mb", type=int,
                        default=w["migration_chunk_bytes"] // 2**20)
    parser.add_argument("--migration-verify-kv", action="store_true",
                        help="checksum each migrated request's KV at commit (debugging)")
    parser.add_argument("--max-prefix-pulls", type=int, default=w["max_prefix_pulls"],
                        help="concurrent prefix pulls in (and out) of this instance")
    parser.add_argument("--prefix-pull-timeout", type=float,
                        default=w["prefix_pull_timeout_s"],
                        help="a pull's peer silent this long: the request runs without it")
    parser.add_argument("--keys-dir", default=w["keys_dir"],
        help="cluster CURVE keys (ferry keys init); default FERRY_KEYS_DIR; empty: plain sockets")
    parser.add_argument("--key-name", default=w["key_name"],
        help="this process's identity in the keys directory (default: its role)")
    parser.add_argument("--step-log", default="",
                        help="append each step's features and time to this file (JSONL); "
                             "{instance_id} in it is replaced by this worker's id (one file "
                             "a worker when several share the argument)")
    parser.add_argument("--grammar-threads", type=int, default=w["grammar_threads"],
                        help="threads filling structured output's token masks (0: half the "
                             "cores, at most 4)")
    parser.add_argument("--drain-timeout-s", type=float, default=w["drain_timeout_s"],
                        help="on SIGTERM, migrate requests away for at most this long, then "
                             "exit (SIGINT: exit at once)")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    inbox = Endpoint.on_port(args.port)
    inbox = Endpoint(bind=args.inbox_bind or inbox.bind,
                     advertise=args.inbox_advertise or inbox.advertise)
    instance_id = args.instance_id or f"{socket.gethostname()}-{args.port}"
    return WorkerConfig(
        instance_id=instance_id,
        inbox=inbox,
        scheduler_addr=args.scheduler_addr,
        model=args.model,
        model_name=args.model_name or default_model_name(args.model),
        device=resolve_device(args.device),
        executor=args.executor,
        sim_profile=args.sim_profile,
        attention_backend=args.attention_backend,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_gb=args.kv_cache_gb,
        engine=EngineConfig(enable_prefix_cache=args.prefix_cache,
                            max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_waiting=args.max_waiting),
        report_interval_s=args.report_interval,
        max_migrations=args.max_migrations,
        migration_stage_limit=args.migration_stage_limit,
        migration_last_stage_blocks=args.migration_last_stage_blocks,
        migration_timeout_s=args.migration_timeout,
        migration_chunk_bytes=args.migration_chunk_mb * 2**20,
        migration_verify_kv=args.migration_verify_kv,
        max_prefix_pulls=args.max_prefix_pulls,
        prefix_pull_timeout_s=args.prefix_pull_timeout,
        drain_timeout_s=args.drain_timeout_s,
        step_log=args.step_log.replace("{instance_id}", instance_id),
        grammar_threads=args.grammar_threads,
        keys_dir=args.keys_dir,
        key_name=args.key_name,
    )


def default_model_name(model: str) -> str:
    """What the gateway calls the model by default (its directory's name), for a worker
    given the directory, a preset name or "random:PRESET"."""
    from ferry.services.worker.model.resolve import RANDOM_PREFIX

    return Path(model.removeprefix(RANDOM_PREFIX)).name or model


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def served_vocab_size(model: str) -> int:
    """The vocabulary of the model the gateway serves, when it is a directory already
    made (0 otherwise): sim workers emit ids the gateway's tokenizer can decode."""
    from pathlib import Path

    from ferry.services.worker.model.resolve import is_preset, preset_dir

    path = preset_dir(model) if is_preset(model) else Path(model)
    if not (path / "config.json").is_file():
        return 0
    from ferry.services.worker.model.config import ModelConfig

    return ModelConfig.from_dir(path).vocab_size


def build_engine(config: WorkerConfig, *, sim_speedup: float = 1.0) -> Engine:
    """The executor the config asks for, wrapped in an engine."""
    if config.executor == "sim":
        from ferry.services.worker.latency_model import Profile
        from ferry.services.worker.sim_executor import SimExecutor

        if not config.sim_profile:
            raise ValueError("--executor sim needs --sim-profile")
        executor = SimExecutor.from_profile(Profile.load(config.sim_profile),
                                            num_blocks=config.num_blocks, sleep=False,
                                            speedup=sim_speedup,
                                            vocab_size=served_vocab_size(config.model))
        return Engine(executor, config.engine, model_identity=config.model)

    from ferry.services.worker.runner import ModelRunner, runner_config_for

    on_cpu = config.device == "cpu"
    kv_gb = config.kv_cache_gb or (DEFAULT_CPU_KV_GB if on_cpu else None)
    runner = ModelRunner(runner_config_for(
        config.model,
        grammar_threads=config.grammar_threads or None,
        device=config.device,
        attention_backend=config.attention_backend,
        block_size=config.block_size,
        num_blocks=config.num_blocks or None,
        kv_cache_gb=None if config.num_blocks else kv_gb,
        max_num_seqs=config.engine.max_num_seqs,
        max_num_tokens=config.engine.max_num_batched_tokens,
    ))
    return Engine(runner, config.engine, model_identity=config.model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry worker", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    configure("worker")
    log = get_logger(instance_id=config.instance_id)
    if config.device == "cpu":
        # Leave cores for the other processes of a local cluster.
        import torch

        torch.set_num_threads(env.torch_threads() or max(1, (os.cpu_count() or 2) // 2))
    engine = build_engine(config, sim_speedup=args.sim_speedup)
    log.info("engine_built", executor=config.executor, num_blocks=engine.blocks.num_total)

    from ferry.services.worker.main import serve

    try:
        import uvloop

        uvloop.run(serve(config, engine))
    except ImportError:
        asyncio.run(serve(config, engine))


if __name__ == "__main__":
    main()
