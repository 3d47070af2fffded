"""`ferry profile`: time real engine steps on a grid and fit the sim executor's latency
model (services/worker/latency_model.py).

Grid: prefill tokens P x decode batch D x decode context C. Each point builds a
ModelBatch of synthetic chunks (one prefill chunk of P tokens, D decodes at context C),
times ModelRunner.execute (which ends in a host sync reading the sampled tokens), and
records the median of several runs. When the KV cache cannot hold D x C distinct tokens,
decodes share blocks (the bytes read per step are the same; the note says so).

    ferry profile --model tiny --device cpu --out services/worker/profiles/tiny-cpu.json

Or from a serving worker's own steps (`ferry worker --step-log PATH`), fitted to whole
engine cycles (step + engine + loop gap: what the simulator should replay), keeping the
model, KV and device fields of a base profile:

    ferry profile --from-step-log steps.jsonl --base llama3-8b-h200.json --out mine.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures

GRIDS = {
    # (prefill tokens, decode batches, decode contexts)
    "cpu": ([0, 16, 64, 256], [0, 1, 4, 16], [64, 512]),
    "gpu": ([0, 256, 1024, 4096, 8192], [0, 1, 16, 64, 128, 256], [512, 2048, 4096]),
}


def synthetic_batch(prefill: int, num_decode: int, context: int, *, block_size: int,
                    num_blocks: int, vocab_size: int) -> ModelBatch:
    chunks = []
    next_block = 0

    def blocks(num_tokens: int) -> tuple[int, ...]:
        nonlocal next_block
        count = -(-num_tokens // block_size)
        ids = tuple((next_block + i) % num_blocks for i in range(count))
        next_block = (next_block + count) % num_blocks
        return ids

    params = SamplingParams(temperature=0.0, seed=0)
    if prefill:
        chunks.append(SeqChunk(req_id="p", token_ids=tuple(i % vocab_size for i in range(prefill)),
                               start_pos=0, block_ids=blocks(prefill), sample=True,
                               sampling=params))
    for i in range(num_decode):
        chunks.append(SeqChunk(req_id=f"d{i}", token_ids=(7,), start_pos=context - 1,
                               block_ids=blocks(context), sample=True, sampling=params))
    return ModelBatch(chunks=tuple(chunks))


def time_batch(runner, batch: ModelBatch, repeats: int) -> float:
    runner.execute(batch)  # warm-up (kernels compiled, graphs captured)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry profile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="model directory, preset name, or random:PRESET (weights in memory;"
                             " default: tiny)")
    parser.add_argument("--device", default=None, help="default: auto")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--name", default="", help="profile name (default: model-device)")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV blocks of the profiled instance (default: the runner's; "
                             "with --from-step-log, the base's)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5")
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None)
    parser.add_argument("--attention-backend", default=None, help="default: auto")
    from_log = parser.add_argument_group("fit to a worker's step log instead of timing a grid")
    from_log.add_argument("--from-step-log", nargs="+", default=[], metavar="LOG",
                          help="`ferry worker --step-log` files (.jsonl, or .jsonl.gz); the "
                               "steps of several are pooled")
    from_log.add_argument("--base", default="",
                          help="the profile whose model, KV and device fields the fit keeps "
                               "(--num-blocks and --device-name override two of them)")
    from_log.add_argument("--step-time-only", action="store_true",
                          help="fit the model step alone, not the whole engine cycle")
    from_log.add_argument("--device-name", default="",
                          help="the card the logging worker ran on (default: the base's)")
    from_log.add_argument("--keep-samples", type=int, default=-1,
                          help="keep this many of the steps in the profile, evenly spaced "
                               "(0: none; default: all). The fit uses every step")
    args = parser.parse_args(argv)
    log_only = {"base": args.base, "step_time_only": args.step_time_only,
                "device_name": args.device_name, "keep_samples": args.keep_samples != -1}
    if args.from_step_log:
        measuring = [f"--{name.replace('_', '-')}" for name in
                     ("model", "device", "repeats", "grid", "attention_backend")
                     if getattr(args, name) is not None]
        if measuring or not args.base:
            parser.error("--from-step-log needs --base and times nothing"
                         + (f": {', '.join(measuring)} do not apply" if measuring else ""))
        if args.keep_samples < -1:
            parser.error("--keep-samples: a count of steps, 0 or more")
        if args.num_blocks is not None and args.num_blocks <= 0:
            parser.error("--num-blocks: the logging worker's KV blocks, 1 or more")
        return profile_from_step_log(args)
    if any(log_only.values()):
        parser.error(", ".join(f"--{k.replace('_', '-')}" for k, v in log_only.items() if v)
                     + " go with --from-step-log")
    for name, default in (("model", "tiny"), ("device", "auto"), ("num_blocks", 0),
                          ("repeats", 5), ("attention_backend", "auto")):
        if getattr(args, name) is None:
            setattr(args, name, default)

    from ferry.services.worker.entry import DEFAULT_CPU_KV_GB, resolve_device
    from ferry.services.worker.model.resolve import RANDOM_PREFIX, preset_config, resolve_model
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    device = resolve_device(args.device)
    is_random = args.model.startswith(RANDOM_PREFIX)  # a preset's shape, weights in memory
    model_name = args.model.removeprefix(RANDOM_PREFIX) if is_random else \
        resolve_model(args.model).name
    prefills, decodes, contexts = GRIDS[args.grid or ("cpu" if device == "cpu" else "gpu")]
    runner = ModelRunner(RunnerConfig(
        model_dir=None if is_random else str(resolve_model(args.model)),
        model_config=preset_config(args.model) if is_random else None,
        random_on_device=is_random,
        device=device, attention_backend=args.attention_backend,
        num_blocks=args.num_blocks or None,
        kv_cache_gb=None if args.num_blocks or device != "cpu" else DEFAULT_CPU_KV_GB,
        max_num_tokens=max(prefills) + max(decodes),
    ))
    samples: list[dict] = []
    fit_rows: list[tuple[StepFeatures, float]] = []
    for prefill in prefills:
        for num_decode in decodes:
            for context in contexts if num_decode else contexts[:1]:
                if not prefill and not num_decode:
                    continue
                if prefill + context > runner.max_model_len:
                    continue
                batch = synthetic_batch(prefill, num_decode, context,
                                        block_size=runner.block_size,
                                        num_blocks=runner.num_blocks,
                                        vocab_size=runner.vocab_size)
                step_s = time_batch(runner, batch, args.repeats)
                features = StepFeatures.of(batch)
                fit_rows.append((features, step_s))
                samples.append({"prefill": prefill, "decode": num_decode, "context": context,
                                "P": features.P, "A": features.A, "D": features.D,
                                "C": features.C, "step_s": step_s})
                print(f"P={prefill:>5} D={num_decode:>4} C={context:>5}  {step_s * 1e3:8.2f} ms",
                      flush=True)
    latency = LatencyModel.fit(fit_rows)
    errors = [abs(latency.step_time(f) - t) / t for f, t in fit_rows]
    mc = runner.model_config
    profile = Profile(
        name=args.name or f"{model_name}-{device}",
        device=_device_name(device),
        model={"name": model_name, "num_layers": mc.num_layers,
               "hidden_size": mc.hidden_size, "num_kv_heads": mc.num_kv_heads,
               "head_dim": mc.head_dim, "dtype": str(runner.dtype).removeprefix("torch.")},
        block_size=runner.block_size,
        kv_block_bytes=runner.block_bytes,
        num_blocks=args.num_blocks or runner.num_blocks,
        max_model_len=runner.max_model_len,
        vocab_size=runner.vocab_size,
        latency=latency,
        samples=samples,
    )
    profile.save(args.out)
    print(json.dumps({"out": args.out, "coefficients": dataclasses.asdict(latency),
                      "fit_median_rel_err": statistics.median(errors),
                      "fit_max_rel_err": max(errors)}, default=str))


def profile_from_step_log(args: argparse.Namespace) -> None:
    from ferry.services.worker import step_log

    base = Profile.load(args.base)
    samples = []
    for path in args.from_step_log:  # gaps within each log: between two is not a loop's
        steps = step_log.read(path)
        step_log.add_gaps(steps)
        samples += steps
    whole_cycle = not args.step_time_only
    latency = step_log.fit(samples, whole_cycle=whole_cycle)
    measured = [step_log.cycle_s(s) if whole_cycle else s["step_s"] for s in samples]
    errors = sorted(abs(latency.step_time(step_log.features(s)) - t) / t
                    for s, t in zip(samples, measured, strict=True))
    kept = samples
    if 0 <= args.keep_samples < len(samples):
        stride = len(samples) / args.keep_samples if args.keep_samples else 0
        kept = [samples[int(i * stride)] for i in range(args.keep_samples)]
    profile = dataclasses.replace(
        base, name=args.name or f"{base.name}-insitu", latency=latency, samples=kept,
        device=args.device_name or base.device,
        num_blocks=base.num_blocks if args.num_blocks is None else args.num_blocks)
    profile.save(args.out)
    print(json.dumps({"out": args.out, "samples": len(samples), "kept": len(kept),
                      "whole_cycle": whole_cycle,
                      "coefficients": dataclasses.asdict(latency),
                      "fit_median_rel_err": errors[len(errors) // 2],
                      "fit_p90_rel_err": errors[int(0.9 * (len(errors) - 1))]}))


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    main()
