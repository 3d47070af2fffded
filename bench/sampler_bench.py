"""Per-step cost of the sampler: plain sampling vs penalties + logprobs (and the rest of
what vLLM's sampling parameters add), at batch 1 and 64.

    python -m ferry.bench.sampler_bench [--device cpu|cuda] [--vocab 32000,128256]
                                        [--batch 1,64] [--out result.json]

A step here is what ModelRunner does after the logits exist: `SamplingTensors.build`
(host lists -> device tensors, penalty entries from each request's tokens, which the
runner keeps as arrays between steps: HistoryArrays, one new token a row each step) and
`run_sampler` (processing, the draw, logprobs), then reading the tokens (and logprobs) on
the host. Logits are random [batch, vocab] float32; each request has a 512-token prompt
and 256 generated tokens.

    plain      temperature 0.8 (vLLM's default sampling: no top-k/top-p)
    pen+lp     plain + presence 0.5, frequency 0.5, repetition 1.1, logprobs 5
    all        pen+lp + min_p 0.05, 8 logit_bias entries, min_tokens (not yet reached:
               EOS suppressed)

(top_p < 1 adds a sort of the whole vocabulary, which costs the same in every case and
is left out so that the difference shows.)

Times are the least of --repeats steps after warm-up (the least disturbed on a shared
machine), in milliseconds. On CPU torch runs
one thread (as a CPU worker does) unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time

import torch

from ferry.common.sampling import SamplingParams
from ferry.services.worker.history_arrays import HistoryArrays
from ferry.services.worker.sampler import (
    SamplingTensors,
    TokenHistory,
    run_sampler,
    token_logprobs,
)

PROMPT_LEN = 512
OUTPUT_LEN = 256
EOS_TOKEN_IDS = (2,)


CASES = ("plain", "pen+lp", "all")


def case_params(case: str, batch: int) -> list[SamplingParams]:
    params = SamplingParams(max_tokens=1024, temperature=0.8)
    if case in ("pen+lp", "all"):
        params = dataclasses.replace(params, presence_penalty=0.5, frequency_penalty=0.5,
                                     repetition_penalty=1.1, logprobs=5)
    if case == "all":
        params = dataclasses.replace(params, min_p=0.05, min_tokens=OUTPUT_LEN + 10,
                                     logit_bias_token_ids=tuple(range(100, 108)),
                                     logit_bias_values=(5.0, -5.0) * 4)
    return [dataclasses.replace(params, seed=i) for i in range(batch)]


def time_step(case: str, batch: int, vocab: int, device: torch.device, repeats: int) -> dict:
    rng = random.Random(batch * 7 + vocab)
    params = case_params(case, batch)
    prompts = [tuple(rng.randrange(vocab) for _ in range(PROMPT_LEN)) for _ in range(batch)]
    outputs = [[rng.randrange(vocab) for _ in range(OUTPUT_LEN)] for _ in range(batch)]
    positions = [PROMPT_LEN + OUTPUT_LEN] * batch
    cache = HistoryArrays(max_entries=2 * batch)  # the runner's, kept across steps
    logits = torch.randn(batch, vocab, device=device, generator=None) * 3

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(cached: bool = True) -> tuple[float, float]:
        """cached: as the runner does, each row's history through its HistoryArrays, one
        new token a row since the last step (the cache's work is timed); else the chunks'
        tuples as they are (the sampler then reads every token)."""
        if cached:
            for row in outputs:  # the decode step before this one made a token
                row.append(rng.randrange(vocab))
        else:
            rows = [TokenHistory(prompts[i], tuple(outputs[i])) for i in range(batch)]
        sync()
        start = time.perf_counter()
        if cached:
            rows = [TokenHistory(*cache.get(f"r{i}", prompts[i], outputs[i]))
                    for i in range(batch)]
        st = SamplingTensors.build(params, positions, vocab_size=vocab, device=device,
                                   histories=rows, eos_token_ids=EOS_TOKEN_IDS)
        sync()
        built = time.perf_counter()
        out = run_sampler(logits, st).to("cpu")
        out.token_ids.tolist()
        if out.logprobs is not None:
            token_logprobs(out, st, params)
        end = time.perf_counter()
        return built - start, end - start

    for _ in range(3):
        step()
    builds, totals = zip(*(step() for _ in range(repeats)), strict=True)
    uncached = [step(cached=False)[0] for _ in range(repeats)]
    return {"case": case, "batch": batch, "vocab": vocab,
            "build_ms": min(builds) * 1e3, "build_uncached_ms": min(uncached) * 1e3,
            "step_ms": min(totals) * 1e3,
            "step_median_ms": statistics.median(totals) * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.bench.sampler_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", default="32000,128256", help="comma-separated sizes")
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for vocab in map(int, args.vocab.split(",")):
            for batch in map(int, args.batch.split(",")):
                for case in CASES:
                    rows.append(time_step(case, batch, vocab, device, args.repeats))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)")
    print(f"sampler step, {device.type} ({name}), torch {torch.__version__}; least of "
          f"{args.repeats}; prompt {PROMPT_LEN} + output {OUTPUT_LEN} tokens a request")
    print(f"{'vocab':>7} {'batch':>5}  {'plain ms':>9} {'pen+lp ms':>10} {'x':>5} "
          f"{'all ms':>8} {'x':>5}  {'pen+lp build ms':>15} {'(tuples) ms':>11}")
    for plain, pen, every in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        print(f"{plain['vocab']:>7} {plain['batch']:>5}  {plain['step_ms']:>9.3f} "
              f"{pen['step_ms']:>10.3f} {pen['step_ms'] / plain['step_ms']:>5.2f} "
              f"{every['step_ms']:>8.3f} {every['step_ms'] / plain['step_ms']:>5.2f}  "
              f"{pen['build_ms']:>15.3f} {pen['build_uncached_ms']:>11.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "repeats": args.repeats,
                       "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "rows": rows},
                      f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
