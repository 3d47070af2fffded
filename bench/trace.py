"""Request traces for `ferry bench serve` / `sim` (DESIGN §8): JSONL, one request a line,

    {"arrival_s": 0.0, "prompt_tokens": 74, "output_tokens": 487, "priority": "normal"}

with arrival times from the start of the trace. Generation is pure and seeded; lengths,
arrivals and priorities draw from independent streams of the seed, so changing the rate
keeps the lengths, and changing the kind keeps the arrival times.

Lengths (the Llumnix paper's workloads, §6.1):
- "S", "M", "L": power laws with means 128 / 256 / 512 tokens on [1, 6000], combined as
  "<input>-<output>", e.g. "S-L" (S-S, M-M, L-L, S-L, L-S; any pair of S/M/L works). The law
  is a discrete shifted power law (Zipf-Mandelbrot, or Pareto II), P(k) ∝ (k + 32)^-a,
  with `a` solved so that the mean matches; the shift keeps the median at tens of tokens
  (a pure Zipf law with mean 128 has a median of 4 tokens).
- "sharegpt", "burstgpt": two-component log-normal mixtures, rounded and clipped to
  [1, 6000], fitted (offline, least squares on log-quantiles) to the statistics the paper
  reports for those datasets:
      ShareGPT  input  mean 306  P50  74  P80  348  P95 1484  P99 3388
                output mean 500  P50 487  P80  781  P95  988  P99 1234
      BurstGPT  input  mean 830  P50 582  P80 1427  P95 2345  P99 3549
                output mean 271  P50 243  P80  434  P95  669  P99  964
  Every statistic is met within 3% on large samples. Inputs and outputs are independent.
Arrivals: a Poisson process at `rate` requests/s (cv = 1), or Gamma-distributed gaps with
coefficient of variation `cv` (> 1 bursty, < 1 smooth, 0 evenly spaced).

Where KV memory is the constraint (prefix caching; bench/workload.py says how prompts
are built from the fields these add):
- "tenants": `tenants` tenants, each a system prompt of uniform(prefix_min, prefix_max)
  tokens, picked by Zipf popularity with exponent `skew`; each request is its tenant's
  prefix plus a user message (log-normal, median 200) and an output (log-normal, median
  150).
- "multiturn": sessions arrive as a Poisson process of rate / `turns` sessions/s, each
  1 + Geometric turns (mean `turns`), `think_s` exponential between a turn's end and the
  next; every turn's prompt is the whole conversation so far plus a new message
  (log-normal, median 150), output log-normal median 200; an optional shared system
  prompt of `system_tokens`. A session stops before its context would pass
  max_total_tokens.
- "longctx": prompts 4k-128k with a heavy tail and short outputs, after the Mooncake
  trace's statistics (mean input ~7.6k, output ~180): log-normal input (median 5500,
  sigma 0.85, clipped to [4096, 131072]), log-normal output (median 150, sigma 0.6).
- "longctx-shared": the same lengths, but half the requests ask about one of `tenants`
  long documents (the prompt: the document, Zipf popularity, then a short question).
In tenants, longctx and longctx-shared, max_total_tokens caps each request's shared
prefix + prompt + output (a prefix by its length alone, so it stays shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

import numpy as np

MAX_LEN = 6000  # longest prompt or output the length laws produce
POWER_LAW_MEANS = {"S": 128, "M": 256, "L": 512}
POWER_LAW_SHIFT = 32
DATASET_KINDS = ("sharegpt", "burstgpt")
CACHE_KINDS = ("tenants", "multiturn", "longctx", "longctx-shared")
KINDS = ("S-S", "M-M", "L-L", "S-L", "L-S", *DATASET_KINDS, *CACHE_KINDS)  # any X-Y works


@dataclass(frozen=True, slots=True)
class LogNormalMix:
    """weight * LogNormal(median_1, sigma_1) + (1 - weight) * LogNormal(median_2, sigma_2)."""

    weight: float
    median_1: float
    sigma_1: float
    median_2: float
    sigma_2: float

    def sample(self, rng: np.random.Generator, num: int) -> np.ndarray:
        first = rng.random(num) < self.weight
        z = rng.standard_normal(num)
        log_x = np.where(
            first,
            math.log(self.median_1) + self.sigma_1 * z,
            math.log(self.median_2) + self.sigma_2 * z,
        )
        return np.clip(np.rint(np.exp(log_x)), 1, MAX_LEN).astype(np.int64)


# (input, output) length laws fitted to the statistics in the module docstring.
DATASET_LAWS = {
    "sharegpt": (
        LogNormalMix(0.703, 58.06, 0.461, 551.7, 0.997),
        LogNormalMix(0.443, 226.9, 0.098, 689.5, 0.2765),
    ),
    "burstgpt": (
        LogNormalMix(0.621, 217.8, 1.222, 1342.6, 0.407),
        LogNormalMix(0.455, 68.69, 1.060, 361.6, 0.440),
    ),
}


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds from the start of the trace
    prompt_tokens: int  # its own new tokens (after a shared prefix or a session's history)
    output_tokens: int
    priority: str  # "normal" | "high"
    prefix_id: str | None = None  # a shared prefix the prompt starts with (bench/workload.py)
    prefix_tokens: int = 0
    session_id: str | None = None  # multi-turn: the session, its turn, the think time
    turn: int = 0
    think_s: float = 0.0

    def as_json(self) -> dict:
        """The JSONL object: the cache fields only where set."""
        out = {"arrival_s": self.arrival_s, "prompt_tokens": self.prompt_tokens,
               "output_tokens": self.output_tokens, "priority": self.priority}
        if self.prefix_id is not None:
            out.update(prefix_id=self.prefix_id, prefix_tokens=self.prefix_tokens)
        if self.session_id is not None:
            out.update(session_id=self.session_id, turn=self.turn, think_s=self.think_s)
        return out


@dataclass(frozen=True, slots=True)
class CacheShape:
    """The knobs of the cache-heavy kinds (see the module docstring)."""

    tenants: int = 150
    skew: float = 1.0  # Zipf exponent of tenant / document popularity
    prefix_min: int = 2048
    prefix_max: int = 8192
    turns: float = 5.0  # mean turns per session
    think_s: float = 10.0  # mean think time between turns
    system_tokens: int = 0  # a system prompt shared by every session

# ---- length laws ------------------------------------------------------------------------------


@functools.cache
def power_law_pmf(mean: float, shift: int = POWER_LAW_SHIFT, max_len: int = MAX_LEN) -> np.ndarray:
    """P(k) ∝ (k + shift)^-a for k = 1..max_len, with `a` solved (bisection) for the mean."""
    if not 1 < mean < (max_len + 1) / 2:
        raise ValueError(f"a power law on [1, {max_len}] cannot have mean {mean}")
    k = np.arange(1, max_len + 1, dtype=np.float64)

    def pmf(a: float) -> np.ndarray:
        weights = (k + shift) ** -a
        return weights / weights.sum()

    low, high = 0.0, 20.0  # the mean falls as `a` grows: ~(max_len + 1) / 2 at 0, ~1 at 20
    for _ in range(100):
        mid = (low + high) / 2
        if float(pmf(mid) @ k) > mean:
            low = mid
        else:
            high = mid
    return pmf((low + high) / 2)


def sample_power_law(rng: np.random.Generator, mean: float, num: int) -> np.ndarray:
    return rng.choice(np.arange(1, MAX_LEN + 1), size=num, p=power_law_pmf(mean))


def sample_lengths(kind: str, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, output_tokens), each of shape [num]."""
    if kind in DATASET_LAWS:
        prompt_law, output_law = DATASET_LAWS[kind]
        return prompt_law.sample(rng, num), output_law.sample(rng, num)
    parts = kind.split("-")
    if len(parts) != 2 or not all(p in POWER_LAW_MEANS for p in parts):
        raise ValueError(
            f"unknown trace kind {kind!r}; expected X-Y with X, Y in S/M/L, or one of {DATASET_KINDS}"
        )
    prompt_mean, output_mean = (POWER_LAW_MEANS[p] for p in parts)
    return sample_power_law(rng, prompt_mean, num), sample_power_law(rng, output_mean, num)


# ---- arrivals ---------------------------------------------------------------------------------


def sample_arrivals(num: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times [num] starting at 0: gaps ~ Gamma(shape 1/cv², mean 1/rate); cv = 1 is
    a Poisson process, cv = 0 evenly spaced."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not cv >= 0:
        raise ValueError(f"cv must be >= 0, got {cv}")
    if num == 0:
        return np.zeros(0)
    if cv == 0:
        gaps = np.full(num - 1, 1.0 / rate)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, scale=1.0 / (rate * shape), size=num - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


# ---- traces -----------------------------------------------------------------------------------


def generate(
    kind: str,
    *,
    num: int,
    rate: float,
    cv: float = 1.0,
    high_frac: float = 0.0,
    seed: int = 0,
    max_total_tokens: int | None = None,
    shape: CacheShape = CacheShape(),
) -> list[TraceRequest]:
    """A seeded trace. max_total_tokens (e.g. a model's context length) caps each request's
    context, shared prefix + prompt + output: the prompt keeps at most max_total_tokens - 1,
    the output gets what is left (multi-turn: a session ends before a turn would pass it)."""
    if max_total_tokens is not None and max_total_tokens < 2:
        raise ValueError(f"max_total_tokens must be >= 2, got {max_total_tokens}")
    if kind in CACHE_KINDS:
        return generate_cached(kind, num=num, rate=rate, cv=cv, seed=seed, shape=shape,
                               max_total_tokens=max_total_tokens or 131_072 + 4096)
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not 0.0 <= high_frac <= 1.0:
        raise ValueError(f"high_frac must be in [0, 1], got {high_frac}")
    length_rng, arrival_rng, priority_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    prompt_tokens, output_tokens = sample_lengths(kind, num, length_rng)
    if max_total_tokens is not None:
        prompt_tokens = np.minimum(prompt_tokens, max_total_tokens - 1)
        output_tokens = np.minimum(output_tokens, max_total_tokens - prompt_tokens)
    arrivals = sample_arrivals(num, rate, cv, arrival_rng)
    high = priority_rng.random(num) < high_frac
    return [
        TraceRequest(
            arrival_s=round(float(arrivals[i]), 6),
            prompt_tokens=int(prompt_tokens[i]),
            output_tokens=int(output_tokens[i]),
            priority="high" if high[i] else "normal",
        )
        for i in range(num)
    ]


def generate_cached(kind: str, *, num: int, rate: float, cv: float, seed: int,
                    shape: CacheShape, max_total_tokens: int) -> list[TraceRequest]:
    """The cache-heavy kinds (module docstring): num requests."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    lengths, arrivals, choice, sessions = rngs

    def lognormal(median: float, sigma: float, n: int, low: int, high: int) -> np.ndarray:
        return np.clip(np.rint(median * np.exp(sigma * lengths.standard_normal(n))),
                       low, high).astype(np.int64)

    def zipf_pick(n: int, count: int) -> np.ndarray:
        weights = 1.0 / np.arange(1, count + 1) ** shape.skew
        return choice.choice(count, size=n, p=weights / weights.sum())

    if kind == "multiturn":
        return _sessions(num, rate, cv, shape, max_total_tokens, lognormal, arrivals, sessions)
    times = sample_arrivals(num, rate, cv, arrivals)
    if kind == "tenants":
        prefix_len = lengths.integers(shape.prefix_min, shape.prefix_max + 1, shape.tenants)
        tenant = zipf_pick(num, shape.tenants)
        messages = lognormal(200, 0.8, num, 8, 4096)
        outputs = lognormal(150, 0.7, num, 8, 2048)
        requests = [TraceRequest(round(float(times[i]), 6), int(messages[i]), int(outputs[i]),
                                 "normal", prefix_id=f"tenant-{tenant[i]}",
                                 prefix_tokens=int(prefix_len[tenant[i]])) for i in range(num)]
        return [_capped(req, max_total_tokens) for req in requests]
    prompts = lognormal(5500, 0.85, num, 4096, 131_072)
    outputs = lognormal(150, 0.6, num, 8, 2048)
    if kind == "longctx":
        return [_capped(TraceRequest(round(float(times[i]), 6), int(prompts[i]),
                                     int(outputs[i]), "normal"), max_total_tokens)
                for i in range(num)]
    # longctx-shared: half the requests ask about one of the tenants' documents
    doc_len = lognormal(5500, 0.85, shape.tenants, 4096, 131_072)
    doc = zipf_pick(num, shape.tenants)
    shared = choice.random(num) < 0.5
    questions = lognormal(60, 0.6, num, 8, 1024)
    requests = [TraceRequest(round(float(times[i]), 6), int(questions[i]), int(outputs[i]),
                             "normal", prefix_id=f"doc-{doc[i]}",
                             prefix_tokens=int(doc_len[doc[i]]))
                if shared[i] else
                TraceRequest(round(float(times[i]), 6), int(prompts[i]), int(outputs[i]),
                             "normal")
                for i in range(num)]
    return [_capped(req, max_total_tokens) for req in requests]


def _capped(req: TraceRequest, max_total_tokens: int) -> TraceRequest:
    """req with prefix + prompt + output <= max_total_tokens. The shared prefix keeps at most
    max_total_tokens - 2 tokens, a function of its length alone, so every request naming
    one prefix still shares all of it; the prompt keeps at least 1, the output what is left
    (at least 1)."""
    prefix = min(req.prefix_tokens, max_total_tokens - 2)
    prompt = min(req.prompt_tokens, max_total_tokens - prefix - 1)
    output = min(req.output_tokens, max_total_tokens - prefix - prompt)
    return dataclasses.replace(req, prefix_tokens=prefix, prompt_tokens=prompt,
                               output_tokens=output)


def _sessions(num, rate, cv, shape, max_total_tokens, lognormal, arrivals, rng):
    """Multi-turn sessions until num requests (see the module docstring)."""
    out: list[TraceRequest] = []
    session_rate = rate / max(1.0, shape.turns)
    starts = sample_arrivals(num, session_rate, cv, arrivals)  # at most num sessions
    for s, start in enumerate(starts):
        num_turns = int(rng.geometric(1.0 / max(1.0, shape.turns)))  # >= 1, mean turns
        context = shape.system_tokens
        for turn in range(num_turns):
            if len(out) == num:
                return out
            message = int(lognormal(150, 0.8, 1, 8, 4096)[0])
            output = int(lognormal(200, 0.7, 1, 8, 2048)[0])
            if context + message + output > max_total_tokens:
                break
            system = {"prefix_id": "system", "prefix_tokens": shape.system_tokens} \
                if shape.system_tokens and turn == 0 else {}
            out.append(TraceRequest(round(float(start), 6), message, output, "normal",
                                    session_id=f"s{s}", turn=turn,
                                    think_s=round(float(rng.exponential(shape.think_s)), 3)
                                    if turn else 0.0, **system))
            context += message + output
    return out


def write_jsonl(trace: Iterable[TraceRequest], out: IO[str]) -> None:
    for req in trace:
        out.write(json.dumps(req.as_json()) + "\n")


def read_jsonl(lines: Iterable[str]) -> list[TraceRequest]:
    """Parse and check a trace (blank lines skipped); ValueError names the bad line."""
    trace = []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            req = TraceRequest(
                arrival_s=float(fields["arrival_s"]),
                prompt_tokens=int(fields["prompt_tokens"]),
                output_tokens=int(fields["output_tokens"]),
                priority=str(fields.get("priority", "normal")),
                prefix_id=None if fields.get("prefix_id") is None else str(fields["prefix_id"]),
                prefix_tokens=int(fields.get("prefix_tokens", 0)),
                session_id=None if fields.get("session_id") is None
                else str(fields["session_id"]),
                turn=int(fields.get("turn", 0)),
                think_s=float(fields.get("think_s", 0.0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"trace line {line_number}: {exc}") from None
        if (
            req.arrival_s < 0
            or req.prompt_tokens < 1
            or req.output_tokens < 1
            or req.priority not in ("normal", "high")
        ):
            raise ValueError(f"trace line {line_number}: out of range: {line.strip()}")
        trace.append(req)
    return trace


def summarize(trace: list[TraceRequest]) -> dict[str, float]:
    prompts = np.array([r.prompt_tokens for r in trace])
    outputs = np.array([r.output_tokens for r in trace])
    return {
        "num_requests": len(trace),
        "duration_s": trace[-1].arrival_s if trace else 0.0,
        "prompt_mean": float(prompts.mean()) if trace else 0.0,
        "prompt_p50": float(np.percentile(prompts, 50)) if trace else 0.0,
        "prompt_p99": float(np.percentile(prompts, 99)) if trace else 0.0,
        "output_mean": float(outputs.mean()) if trace else 0.0,
        "output_p50": float(np.percentile(outputs, 50)) if trace else 0.0,
        "output_p99": float(np.percentile(outputs, 99)) if trace else 0.0,
        "high_frac": sum(r.priority == "high" for r in trace) / len(trace) if trace else 0.0,
    }


# ---- command line: `ferry bench trace …` ------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind", default="M-M", help=f"length law: {', '.join(KINDS)} (any X-Y of S/M/L)"
    )
    parser.add_argument("--rate", type=float, default=1.0, help="mean arrival rate, requests/s")
    parser.add_argument("--num", type=int, default=1000, help="number of requests")
    parser.add_argument(
        "--cv", type=float, default=1.0, help="coefficient of variation of gaps (1: Poisson)"
    )
    parser.add_argument(
        "--high-frac", type=float, default=0.0, help="fraction of high-priority requests"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-total-tokens", type=int, default=None, help="cap prompt + output (context length)"
    )
    parser.add_argument("--out", default="-", help="JSONL file to write; - for stdout")
    cache = parser.add_argument_group("cache-heavy kinds (tenants, multiturn, longctx-shared)")
    d = CacheShape()
    cache.add_argument("--tenants", type=int, default=d.tenants,
                       help="tenants (system prompts), or documents for longctx-shared")
    cache.add_argument("--skew", type=float, default=d.skew, help="Zipf exponent of popularity")
    cache.add_argument("--prefix-min", type=int, default=d.prefix_min)
    cache.add_argument("--prefix-max", type=int, default=d.prefix_max)
    cache.add_argument("--turns", type=float, default=d.turns, help="mean turns per session")
    cache.add_argument("--think-s", type=float, default=d.think_s,
                       help="mean think time between turns")
    cache.add_argument("--system-tokens", type=int, default=d.system_tokens,
                       help="a system prompt every session shares")


def shape_from_args(args: argparse.Namespace) -> CacheShape:
    return CacheShape(tenants=args.tenants, skew=args.skew, prefix_min=args.prefix_min,
                      prefix_max=args.prefix_max, turns=args.turns, think_s=args.think_s,
                      system_tokens=args.system_tokens)


def run(args: argparse.Namespace) -> int:
    trace = generate(
        args.kind,
        num=args.num,
        rate=args.rate,
        cv=args.cv,
        high_frac=args.high_frac,
        seed=args.seed,
        max_total_tokens=args.max_total_tokens,
        shape=shape_from_args(args),
    )
    if args.out == "-":
        write_jsonl(trace, sys.stdout)
    else:
        with open(args.out, "w") as out:
            write_jsonl(trace, out)
    print(json.dumps(summarize(trace)), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ferry bench trace", description="Write a request trace (JSONL)."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
        raise


if __name__ == "__main__":
    sys.exit(main())
