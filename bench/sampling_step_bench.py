"""What vLLM's sampling extras cost a whole decode step: the model's forward pass and the
sampler together, as a worker runs them (`ModelRunner.execute`), plain vs extras on.

    python -m ferry.bench.sampling_step_bench [--model random:llama3-8b] [--device cuda]
                                              [--batch 1,64] [--prompt-len 512]
                                              [--repeats 20] [--out result.json]

The sampler alone (ferry.bench.sampler_bench) is a few small kernels behind a multi-ms
forward pass, and its host work (building the step's sampling tensors) runs while the
GPU is busy with that pass; only this whole step shows what a user pays. Cases, every
row of the batch alike:

    plain    temperature 0.8 (vLLM's default sampling)
    pen+lp   plain + presence 0.5, frequency 0.5, repetition 1.1, logprobs 5
    all      pen+lp + a json_schema response format (ORDER_SCHEMA of grammar_bench: the
             grammar's bitmask filled on the runner's helper thread during the forward
             pass, applied on the device)

Each row is a decode request with a --prompt-len random prompt whose output so far is a
walk through ORDER_SCHEMA's grammar (so the grammar rows stay valid) that grows by one
token a step: the penalties see a growing history (through the runner's HistoryArrays),
the matchers advance one token a step. Steps of the three cases alternate (plain, pen+lp,
all, plain, ...) so all see the same disturbances; each case has its own request ids.
Times are medians (and least) of --repeats steps after warm-up, in milliseconds; for the
grammar case, `mask` is the helper thread's time filling the step's masks and `wait` the
part of it the step waited for after its forward pass.

The grammar walks a real vocabulary of the model's size: by default a byte-level BPE
trained here to that many tokens (grammar_bench's; a random:PRESET directory's own
tokenizer has 4,096 trained tokens and reserved ids up to the vocabulary, which makes the
masks cheaper than a real model's); --tokenizer model uses the model directory's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ferry.bench.grammar_bench import ORDER_SCHEMA, bench_tokenizer, walks
from ferry.common import structured
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk

CASES = ("plain", "pen+lp", "all")
WARMUP = 3


def case_params(case: str, row: int) -> SamplingParams:
    params = SamplingParams(max_tokens=1024, temperature=0.8, seed=row)
    if case in ("pen+lp", "all"):
        params = dataclasses.replace(params, presence_penalty=0.5, frequency_penalty=0.5,
                                     repetition_penalty=1.1, logprobs=5)
    if case == "all":
        params = dataclasses.replace(params, grammar_kind="json",
                                     grammar=structured.json_spec(ORDER_SCHEMA))
    return params


def make_runner(model: str, device: str, *, batch: int, max_len: int, tokenizer_dir: str,
                grammar_threads: int | None = None):
    """A worker's ModelRunner for `model` (random:PRESET: weights drawn on the device)
    with KV for `batch` requests of max_len tokens."""
    from ferry.services.worker.runner import ModelRunner, runner_config_for

    blocks_per_row = -(-max_len // 16)
    return ModelRunner(runner_config_for(
        model, device=device, block_size=16,
        num_blocks=batch * blocks_per_row, max_model_len=max_len + 16,
        max_num_seqs=batch, max_num_tokens=max(2048, batch),
        tokenizer_dir=tokenizer_dir, grammar_threads=grammar_threads))


def trained_tokenizer_dir(model: str, into: Path) -> str:
    """A directory holding a tokenizer.json trained to the model's vocabulary size."""
    from ferry.services.worker.model.config import ModelConfig
    from ferry.services.worker.model.resolve import RANDOM_PREFIX, preset_config, resolve_model

    if model.startswith(RANDOM_PREFIX):
        vocab = preset_config(model).vocab_size
    else:
        vocab = ModelConfig.from_dir(resolve_model(model)).vocab_size
    (into / "tokenizer.json").write_text(bench_tokenizer(vocab))
    return str(into)


def time_batch(runner, batch: int, prompt_len: int, repeats: int, seed: int) -> list[dict]:
    """One row per case at this batch size."""
    rng = random.Random(seed)
    vocab = runner.vocab_size
    steps = WARMUP + repeats
    sequences = walks(runner.grammars, case_params("all", 0), batch, steps, seed)
    starts = [len(s) - steps for s in sequences]
    prompts = [tuple(rng.randrange(vocab) for _ in range(prompt_len)) for _ in range(batch)]
    blocks_per_row = runner.num_blocks // batch

    def step_batch(case: str, k: int) -> ModelBatch:
        chunks = []
        for i, seq in enumerate(sequences):
            outputs = seq[: starts[i] + k]  # made before this step; the last is fed now
            start_pos = prompt_len + len(outputs) - 1
            chunks.append(SeqChunk(
                req_id=f"{case}-{i}", token_ids=(outputs[-1],), start_pos=start_pos,
                block_ids=tuple(range(i * blocks_per_row, (i + 1) * blocks_per_row)),
                sample=True, sampling=case_params(case, i), prompt_token_ids=prompts[i],
                output_token_ids=outputs))
        return ModelBatch(chunks=tuple(chunks))

    times: dict[str, list[float]] = {case: [] for case in CASES}
    waits: list[float] = []
    masks: list[float] = []
    for k in range(1, steps + 1):
        for case in CASES:
            batch_k = step_batch(case, k)
            wait_before, mask_before = runner.grammar_wait_s, runner.grammar_mask_s
            start = time.perf_counter()
            sampled = runner.execute(batch_k)
            elapsed = time.perf_counter() - start
            if case != "plain":
                assert sampled.logprobs is not None and len(sampled.logprobs) == batch
            if k > WARMUP:
                times[case].append(elapsed)
                if case == "all":
                    waits.append(runner.grammar_wait_s - wait_before)
                    masks.append(runner.grammar_mask_s - mask_before)
    rows = []
    plain_ms = statistics.median(times["plain"]) * 1e3
    for case in CASES:
        median_ms = statistics.median(times[case]) * 1e3
        row = {"case": case, "batch": batch, "prompt_len": prompt_len, "vocab": vocab,
               "step_ms": median_ms, "step_min_ms": min(times[case]) * 1e3,
               "over_plain": median_ms / plain_ms - 1.0}
        if case == "all":
            row["grammar_wait_ms"] = statistics.median(waits) * 1e3
            row["grammar_mask_ms"] = statistics.median(masks) * 1e3
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.bench.sampling_step_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama3-8b",
                        help="model directory, preset, or random:PRESET")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: 1 on CPU, as a CPU worker; torch's "
                             "default on a GPU, as a GPU worker)")
    parser.add_argument("--grammar-threads", type=int, default=0,
                        help="llguidance's mask threads (0: the worker's default)")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="set the GIL's switch interval, s (default: CPython's, 0.005, "
                             "as a worker runs)")
    parser.add_argument("--tokenizer", choices=("trained", "model"), default="trained",
                        help="the grammar's vocabulary: a BPE trained to the model's size, "
                             "or the model directory's tokenizer")
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    batches = [int(b) for b in args.batch.split(",")]
    max_len = args.prompt_len + 64 + WARMUP + args.repeats  # walks are < 40 + steps tokens
    scratch = tempfile.TemporaryDirectory(prefix="ferry-sampling-step-")
    from ferry.services.worker.model.resolve import resolve_model

    tokenizer_dir = (trained_tokenizer_dir(args.model, Path(scratch.name))
                     if args.tokenizer == "trained" else str(resolve_model(args.model)))
    runner = make_runner(args.model, args.device, batch=max(batches), max_len=max_len,
                         tokenizer_dir=tokenizer_dir,
                         grammar_threads=args.grammar_threads or None)
    if runner.grammars is None:
        raise SystemExit(f"{args.model}: no tokenizer.json, so no grammar case")
    rows = []
    for batch in batches:
        rows += time_batch(runner, batch, args.prompt_len, args.repeats, seed=batch)
    device = runner.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                 f"thread(s)")
    print(f"whole decode step ({args.model}, {device.type}: {name}, torch {torch.__version__});"
          f" median (least) of {args.repeats}; prompt {args.prompt_len} tokens; "
          f"{torch.get_num_threads()} torch thread(s), "
          f"{args.grammar_threads or 'default'} grammar thread(s), GIL switch interval "
          f"{sys.getswitchinterval() * 1e3:g} ms")
    print(f"{'batch':>5}  {'plain ms':>16} {'pen+lp ms':>16} {'over':>6} {'all ms':>16} "
          f"{'over':>6}  {'mask ms':>8} {'mask wait ms':>12}")

    def cell(row: dict) -> str:
        return f"{row['step_ms']:.3f} ({row['step_min_ms']:.3f})"

    for plain, pen, every in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        print(f"{plain['batch']:>5}  {cell(plain):>16} {cell(pen):>16} "
              f"{pen['over_plain']:>6.1%} {cell(every):>16} {every['over_plain']:>6.1%}  "
              f"{every['grammar_mask_ms']:>8.3f} {every['grammar_wait_ms']:>12.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "model": args.model, "tokenizer": args.tokenizer,
                       "torch_threads": torch.get_num_threads(),
                       "switch_interval_s": sys.getswitchinterval(),
                       "grammar_threads": args.grammar_threads or None,
                       "torch": torch.__version__,
                       "repeats": args.repeats, "schema": ORDER_SCHEMA, "rows": rows},
                      f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
