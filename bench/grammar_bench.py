"""Per-step cost of structured output in the sampler: grammar masks on (a json_schema of a
realistic object) vs off, at batch 1 and 64.

    python -m ferry.bench.grammar_bench [--device cpu|cuda] [--vocab 32000]
                                        [--batch 1,64] [--out result.json]

A step is what ModelRunner does after the logits exist (as in sampler_bench.py: plain
sampling, temperature 0.8): `SamplingTensors.build`, `run_sampler`, reading the tokens on
the host. With grammar masks on, every row is a request inside ORDER_SCHEMA (a nested
order: strings, enums, numbers, a date pattern, an array of line items) at its own place,
and each step adds

    mask   Grammars.fill_bitmask: each row's matcher takes the token of its last step
           (as in a worker, from the request's output tokens) and fills its row of the
           [batch, vocab/32] int32 bitmask (llguidance, GIL released), with the book
           sharded over --grammar-threads threads (the worker's layout) or shared by them
           (--layouts)
    apply  the bitmask to the device and unpacked there onto the logits (-inf)

`off` and `on` are whole steps (on = mask + build + apply + sampling, serial); `mask` and
`apply` alone are beside them. In a worker the mask runs on a helper thread while the
step's forward pass runs, so only `apply` (and any mask time past the forward pass, the
runner's `grammar_wait_s`) adds to a step.

The tokenizer is a byte-level BPE of --vocab tokens trained here on Python's standard
library (as the tiny model's; cached under ~/.cache/ferry), so the mask walks a real
vocabulary of that size. Rows walk the grammar with tokens drawn uniformly among the
allowed ones (a random model's output: strings of arbitrary tokens).

Times are the least of --repeats steps after warm-up, in milliseconds; on CPU torch runs
one thread (as a CPU worker does) and llguidance --grammar-threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from ferry.common import structured
from ferry.common.sampling import SamplingParams
from ferry.services.worker.grammar import GrammarRow, Grammars
from ferry.services.worker.sampler import SamplingTensors, apply_token_bitmask, run_sampler

EOS_TOKEN_IDS = (1,)  # make_model's <|end_of_text|>
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "email": {"type": "string", "maxLength": 60},
            "tier": {"enum": ["free", "pro", "enterprise"]}},
            "required": ["name", "email", "tier"], "additionalProperties": False},
        "placed": {"type": "string", "pattern": "^2[0-9]{3}-[01][0-9]-[0-3][0-9]$"},
        "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
            "type": "object", "properties": {
                "sku": {"type": "string", "maxLength": 16},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                "unit_price": {"type": "number", "minimum": 0},
                "gift": {"type": "boolean"}},
            "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}},
        "notes": {"type": ["string", "null"], "maxLength": 200},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
    },
    "required": ["order_id", "customer", "placed", "items", "status"],
    "additionalProperties": False,
}
WARMUP = 3


def bench_tokenizer(vocab_size: int) -> str:
    """tokenizer.json text of a byte-level BPE of vocab_size tokens (specials first, as
    make_model's), trained once and cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ferry.services.worker.model.make_model import (
        SPECIAL_TOKENS,
        TRAIN_CORPUS_CHARS,
        _corpus_files,
    )

    path = Path.home() / ".cache" / "ferry" / f"bench-bpe-{vocab_size}.json"
    if path.is_file():
        return path.read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    files, chars = [], 0
    for f in _corpus_files():  # more text than the tiny model's: enough merges for 32k
        files.append(f)
        chars += f.stat().st_size
        if chars > 8 * TRAIN_CORPUS_CHARS:
            break
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files),
                            trainer)
    num_reserved = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(num_reserved)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str())
    return tok.to_str()


def walks(grammars: Grammars, sampling: SamplingParams, batch: int, steps: int,
          seed: int) -> list[tuple[int, ...]]:
    """Per row, a token sequence through the grammar: a random prefix (where the row
    stands when timing starts) then `steps` more tokens; drawn uniformly among the
    allowed tokens, retried until long enough."""
    rng = random.Random(seed)
    out: list[tuple[int, ...]] = []
    while len(out) < batch:
        need = rng.randrange(4, 40) + steps
        tokens: list[int] = []
        for _ in range(need):
            words = grammars.fill_bitmask([GrammarRow("walk", sampling, tuple(tokens))])[0]
            bits = ((words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
            allowed = [t for t in bits.nonzero().flatten().tolist()
                       if t < grammars.vocab_size and t not in EOS_TOKEN_IDS]
            if not allowed:
                break
            tokens.append(rng.choice(allowed))
        grammars.forget("walk")
        if len(tokens) == need:
            out.append(tuple(tokens))
    return out


def time_pair(grammars: Grammars, batch: int, vocab: int, device: torch.device,
              repeats: int, seed: int) -> tuple[dict, dict]:
    """(off, on) rows. Their steps alternate (off, on, off, on...), so both see the same
    disturbances of a shared machine."""
    spec = structured.json_spec(ORDER_SCHEMA)
    plain = [SamplingParams(max_tokens=1024, temperature=0.8, seed=i) for i in range(batch)]
    constrained = [SamplingParams(max_tokens=1024, temperature=0.8, seed=i, grammar_kind="json",
                                  grammar=spec) for i in range(batch)]
    logits = torch.randn(batch, vocab, device=device) * 3
    steps = WARMUP + repeats
    sequences = walks(grammars, constrained[0], batch, steps, seed)
    starts = [len(s) - steps for s in sequences]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(k: int, on: bool) -> tuple[float, float, float]:
        """(mask, apply, whole step) seconds."""
        params = constrained if on else plain
        sync()
        start = time.perf_counter()
        bitmask, mask_s, apply_s = None, 0.0, 0.0
        if on:
            bitmask = grammars.fill_bitmask([
                GrammarRow(f"r{i}", params[i], seq[: starts[i] + k])
                for i, seq in enumerate(sequences)])
            mask_s = time.perf_counter() - start
        st = SamplingTensors.build(params, [600] * batch, vocab_size=vocab, device=device,
                                   grammar_rows=list(range(batch)) if on else (),
                                   grammar_bitmask=bitmask)
        if on:  # the apply alone (run_sampler applies it again, inside the whole step)
            sync()
            applied = time.perf_counter()
            apply_token_bitmask(logits, st.grammar_bitmask, st.grammar_rows)
            sync()
            apply_s = time.perf_counter() - applied
        out = run_sampler(logits, st).to("cpu")
        tokens = out.token_ids.tolist()
        end = time.perf_counter()
        if on:  # every drawn token is one the grammar allows
            for i, token in enumerate(tokens):
                word = int(bitmask[i, token // 32])
                assert (word >> (token % 32)) & 1, (i, token)
        return mask_s, apply_s, end - start - apply_s

    for k in range(WARMUP):
        step(k, False)
        step(k, True)
    off, on = [], []
    for k in range(WARMUP, steps):
        off.append(step(k, False)[2])
        on.append(step(k, True))
    masks, applies, totals = zip(*on, strict=True)
    base = {"batch": batch, "vocab": vocab}
    return (base | {"grammar": False, "step_ms": min(off) * 1e3,
                    "step_median_ms": statistics.median(off) * 1e3},
            base | {"grammar": True, "step_ms": min(totals) * 1e3,
                    "step_median_ms": statistics.median(totals) * 1e3,
                    "mask_ms": min(masks) * 1e3, "mask_median_ms": statistics.median(masks) * 1e3,
                    "apply_ms": min(applies) * 1e3,
                    "apply_median_ms": statistics.median(applies) * 1e3})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.bench.grammar_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", default="32000", help="comma-separated sizes")
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--grammar-threads", type=int, default=2,
                        help="llguidance's threads (the worker's default: half the cores, "
                             "at most 4)")
    parser.add_argument("--layouts", default="sharded",
                        help="comma-separated: sharded (the worker's: a shard of the book per "
                             "thread), shared (one book, one executor of all the threads)")
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for vocab in map(int, args.vocab.split(",")):
            for layout in args.layouts.split(","):
                if layout not in ("sharded", "shared"):
                    raise SystemExit(f"unknown layout {layout!r}")
                grammars = Grammars(bench_tokenizer(vocab), vocab_size=vocab,
                                    eos_token_ids=EOS_TOKEN_IDS,
                                    num_threads=args.grammar_threads,
                                    shard=layout == "sharded", pin_memory=device.type == "cuda")
                for batch in map(int, args.batch.split(",")):
                    rows += [row | {"layout": layout} for row in time_pair(
                        grammars, batch, vocab, device, args.repeats, seed=batch)]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                 f"torch thread(s), {args.grammar_threads} llguidance thread(s)")
    print(f"sampler step with grammar masks, {device.type} ({name}), torch "
          f"{torch.__version__}; least (median) of {args.repeats}; json_schema ORDER_SCHEMA")
    print(f"{'vocab':>7} {'layout':>8} {'batch':>5}  {'off ms':>16} {'on ms':>16} {'x':>5}  "
          f"{'mask ms':>14} {'apply ms':>14}")

    def both(row: dict, key: str) -> str:
        return f"{row[key + '_ms']:.3f} ({row[key + '_median_ms']:.3f})"

    for off, on in zip(rows[::2], rows[1::2], strict=True):
        print(f"{off['vocab']:>7} {off['layout']:>8} {off['batch']:>5}  {both(off, 'step'):>16} "
              f"{both(on, 'step'):>16} {on['step_ms'] / off['step_ms']:>5.2f}  "
              f"{both(on, 'mask'):>14} {both(on, 'apply'):>14}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "repeats": args.repeats,
                       "schema": ORDER_SCHEMA, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
