"""`ferry generate`: offline generation in one process (no sockets), one JSON object per
prompt on stdout: {"prompt_token_ids", "token_ids", "text"}."""

from __future__ import annotations

import argparse
import json
import sys

from ferry.common.sampling import SamplingParams


def parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry generate", description=__doc__)
    parser.add_argument("--model", default="tiny", help="model directory or preset name")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompt-ids", action="append", default=[], type=parse_ids,
                        help="comma-separated token ids (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="auto",
                        choices=["auto", "torch", "triton", "flash"])
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="JSON lines (the only format)")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompt_ids:
        parser.error("give at least one --prompt or --prompt-ids")

    from ferry.common.config import EngineConfig
    from ferry.common.text import Tokenizer
    from ferry.services.worker.engine.engine import Engine, RequestRejected
    from ferry.services.worker.entry import DEFAULT_CPU_KV_GB, resolve_device
    from ferry.services.worker.model.resolve import resolve_model
    from ferry.services.worker.runner import ModelRunner, RunnerConfig

    try:
        model_dir = resolve_model(args.model)
        tokenizer = Tokenizer(model_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"ferry generate: {err}", file=sys.stderr)
        sys.exit(2)
    prompts = [tokenizer.encode(text) for text in args.prompt] + args.prompt_ids
    device = resolve_device(args.device)
    runner = ModelRunner(RunnerConfig(
        model_dir=str(model_dir), device=device, attention_backend=args.attention_backend,
        num_blocks=args.num_blocks,
        kv_cache_gb=None if args.num_blocks else (DEFAULT_CPU_KV_GB if device == "cpu" else None),
        max_num_tokens=args.max_num_batched_tokens,
    ))
    engine = Engine(runner, EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              ignore_eos=args.ignore_eos)
    try:
        sampling.validate()
        outputs = engine.generate(prompts, sampling)
    except (RequestRejected, ValueError) as err:
        print(f"ferry generate: {err}", file=sys.stderr)
        sys.exit(2)
    for prompt, token_ids in zip(prompts, outputs, strict=True):
        print(json.dumps({
            "prompt_token_ids": prompt,
            "token_ids": token_ids,
            "text": tokenizer.decode(token_ids, skip_special_tokens=True),
        }))


if __name__ == "__main__":
    main()
