"""`ferry bench engine`: the engine on one GPU against its roofline and transformers.

Model: a preset's shape (default llama3-8b) with random bf16 weights drawn on the GPU.
Prints one table and writes JSON (--out):

- decode step time (ModelRunner.execute: inputs, CUDA-graph replay, sampling, reading the
  tokens) at batch {1,16,64,256} x context {512,4096}, beside its roofline
  (weight bytes + KV bytes read) / the card's copy bandwidth, measured in the same run
  (a 1 GiB device-to-device copy: bytes read + written per second), and the ratio;
- prefill tokens/s and MFU at 2k and 8k tokens (one chunk; FLOPs = 2 x params x T
  + causal attention 2 x T^2 x head_dim x q_heads x layers);
- end-to-end generation throughput at batch 64 (128-token prompts, 128 new tokens,
  greedy): Ferry's engine.generate vs transformers' generate on the same shape, same run.

When batch x context exceeds the KV cache, sequences share blocks (block ids modulo the
cache): every sequence still reads its full context, so the bytes moved are as counted.
The KV cache is sized from the card's free memory (at most 60 GiB), leaving room for the
transformers baseline, so the same command runs on an 80 GB H100 and a 141 GB H200.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

BF16_FLOPS = 790e12  # measured dense bf16 matmul rate of an H100 and an H200 (both ~790)
MAX_KV_CACHE_GB = 60.0  # what the H200 results in bench/results/h200 used
ACTIVATIONS_GIB = 6.0  # set aside for the runner's largest step and its CUDA graphs
TRANSFORMERS_EXTRA_GIB = 8.0  # the baseline's KV and activations at batch 64, beside its weights


def copy_bandwidth_bytes_s(device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """The device's copy rate, bytes read + written per second (median of `repeats` copies
    of `nbytes`): the roofline's bandwidth, measured on the card that runs the bench."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        dst.copy_(src)
        _sync()
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def kv_cache_gb_from_free_memory(args) -> float:
    """KV cache GiB: the free memory less the weights, the runner's activations and (unless
    skipped) the transformers baseline, at most MAX_KV_CACHE_GB."""
    import torch

    from ferry.services.worker.model.resolve import preset_config

    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    weights_gib = preset_config(args.preset).num_params * 2 / 2**30  # bf16
    baseline_gib = 0.0 if args.skip_transformers else weights_gib + TRANSFORMERS_EXTRA_GIB
    usable = 0.9 * (free_gib - weights_gib - ACTIVATIONS_GIB - baseline_gib)
    if usable < 1.0:
        raise SystemExit(f"only {free_gib:.0f} GiB free: too little for {args.preset} "
                         "with the transformers baseline (try --skip-transformers)")
    return min(MAX_KV_CACHE_GB, usable)


def _runner(args):
    from ferry.services.worker.model.resolve import preset_config
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    config = preset_config(args.preset)
    if args.num_layers:
        import dataclasses

        config = dataclasses.replace(config, num_layers=args.num_layers)
    return ModelRunner(RunnerConfig(
        model_config=config, random_on_device=True, device=args.device,
        attention_backend=args.attention_backend, kv_cache_gb=args.kv_cache_gb or None,
        max_num_seqs=256, max_num_tokens=8192 + 256, max_model_len=8192 + 16))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # execute() ends by reading the sampled tokens: a host sync
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_table(runner, args, copy_bytes_s: float) -> list[dict]:
    from ferry.services.worker.profile import synthetic_batch

    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = runner.block_bytes / runner.block_size
    rows = []
    for batch_size in (1, 16, 64, 256):
        for context in (512, 4096):
            batch = synthetic_batch(0, batch_size, context, block_size=runner.block_size,
                                    num_blocks=runner.num_blocks, vocab_size=runner.vocab_size)
            step_s = median_time(lambda b=batch: runner.execute(b), args.repeats)
            roof_s = (weight_bytes + batch_size * context * kv_per_token) / copy_bytes_s
            rows.append({"batch": batch_size, "context": context, "step_ms": step_s * 1e3,
                         "roofline_ms": roof_s * 1e3, "ratio": step_s / roof_s,
                         "aliased": batch_size * context > runner.num_blocks * runner.block_size})
    return rows


def prefill_table(runner, args) -> list[dict]:
    from ferry.services.worker.profile import synthetic_batch

    c = runner.model_config
    params = sum(p.numel() for n, p in runner.model.named_parameters() if "embed" not in n)
    params -= c.vocab_size * c.hidden_size if not c.tie_word_embeddings else 0  # lm_head: 1 row
    rows = []
    for num_tokens in (2048, 8192):
        if num_tokens >= runner.max_model_len:
            continue
        batch = synthetic_batch(num_tokens, 0, 0, block_size=runner.block_size,
                                num_blocks=runner.num_blocks, vocab_size=runner.vocab_size)
        step_s = median_time(lambda b=batch: runner.execute(b), max(3, args.repeats // 4))
        flops = 2 * params * num_tokens + 2 * num_tokens**2 * c.head_dim * c.num_heads * c.num_layers
        rows.append({"tokens": num_tokens, "ms": step_s * 1e3, "tokens_per_s": num_tokens / step_s,
                     "tflops": flops / step_s / 1e12, "mfu": flops / step_s / BF16_FLOPS})
    return rows


def generate_throughput(runner, args) -> dict:
    """Ferry's engine vs transformers, batch 64, same prompt and output lengths."""
    import torch

    from ferry.common.config import EngineConfig
    from ferry.common.sampling import SamplingParams
    from ferry.services.worker.engine.engine import Engine

    batch, prompt_len, new_tokens = args.gen_batch, 128, 128
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, runner.vocab_size, (batch, prompt_len), generator=gen)
    engine = Engine(runner, EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # Warm-up on the measured shapes (Triton compiles a kernel per new specialisation).
    engine.generate(prompts.tolist(), SamplingParams(max_tokens=4, temperature=0.0,
                                                     ignore_eos=True))
    _sync()
    start = time.perf_counter()
    outs = engine.generate(prompts.tolist(), params)
    ours_s = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in outs)
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "ferry_tokens_per_s": batch * new_tokens / ours_s}
    if args.skip_transformers:
        return result
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in runner.model_config.to_hf_dict()
                                            .items() if k != "architectures"})
    torch.set_default_dtype(runner.dtype)
    with torch.device(runner.device):
        hf = transformers.LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    ids = prompts.to(runner.device)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                  pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids),
                    **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        _sync()
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        _sync()
        hf_s = time.perf_counter() - start
    assert out.shape[1] == prompt_len + new_tokens
    del hf
    result.update(transformers_tokens_per_s=batch * new_tokens / hf_s,
                  speedup=result["ferry_tokens_per_s"] / (batch * new_tokens / hf_s))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    parser.add_argument("--num-layers", type=int, default=0, help="override (quick checks)")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--kv-cache-gb", type=float, default=0.0,
                        help="KV cache GiB; 0: from the free memory (at most 60)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default="")


def run(args: argparse.Namespace) -> dict:
    import torch

    cuda = torch.device(args.device).type == "cuda"
    if not args.kv_cache_gb:
        args.kv_cache_gb = kv_cache_gb_from_free_memory(args) if cuda else 1.0
    copy_bytes_s = copy_bandwidth_bytes_s(args.device)
    runner = _runner(args)
    result = {
        "device": torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu",
        "copy_bytes_s": copy_bytes_s, "kv_cache_gb": args.kv_cache_gb,
        "preset": args.preset,
        "num_layers": runner.model_config.num_layers, "dtype": str(runner.dtype),
        "attention_backend": runner.attention_backend, "cuda_graphs": runner.graphs is not None,
        "num_kv_blocks": runner.num_blocks,
        "decode": decode_table(runner, args, copy_bytes_s), "prefill": prefill_table(runner, args),
        "generate": generate_throughput(runner, args),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    lines = [f"engine bench: {result['preset']} ({result['num_layers']} layers, "
             f"{result['dtype']}, {result['attention_backend']}, graphs "
             f"{result['cuda_graphs']}) on {result['device']}; copy "
             f"{result['copy_bytes_s'] / 1e12:.2f} TB/s (the roofline's), KV "
             f"{result['kv_cache_gb']:.0f} GiB",
             f"{'decode':<8}{'batch':>6}{'ctx':>6}{'step ms':>10}{'roof ms':>10}{'ratio':>7}"]
    for row in result["decode"]:
        lines.append(f"{'':<8}{row['batch']:>6}{row['context']:>6}{row['step_ms']:>10.3f}"
                     f"{row['roofline_ms']:>10.3f}{row['ratio']:>7.2f}"
                     + ("  (blocks shared)" if row["aliased"] else ""))
    lines.append(f"{'prefill':<8}{'tokens':>6}{'ms':>10}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for row in result["prefill"]:
        lines.append(f"{'':<8}{row['tokens']:>6}{row['ms']:>10.2f}{row['tokens_per_s']:>10.0f}"
                     f"{row['tflops']:>9.1f}{row['mfu']:>7.2%}")
    gen = result["generate"]
    line = (f"generate batch {gen['batch']} x {gen['prompt_len']}+{gen['new_tokens']}: ferry "
            f"{gen['ferry_tokens_per_s']:.0f} tok/s")
    if "transformers_tokens_per_s" in gen:
        line += (f", transformers {gen['transformers_tokens_per_s']:.0f} tok/s, "
                 f"speedup {gen['speedup']:.1f}x")
    lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry bench engine", description=__doc__.splitlines()[0])
    add_arguments(parser)
    result = run(parser.parse_args(argv))
    print(format_table(result))


if __name__ == "__main__":
    main()
