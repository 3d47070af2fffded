"""What the engine hands its executor each step, and what the executor must offer.

The engine decides *what* runs (see scheduler.py); an executor runs it: the real model
(services/worker/runner.py) or the latency model (services/worker/sim_executor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ferry.common.sampling import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True, kw_only=True)
class SeqChunk:
    """One request's slice of a step: a prefill chunk or a single decode token."""

    req_id: str
    token_ids: tuple[int, ...]  # tokens to feed this step, len >= 1
    start_pos: int  # position of token_ids[0] == tokens already in the KV cache
    block_ids: tuple[int, ...]  # block table; covers positions [0, start_pos + len(token_ids))
    sample: bool  # sample one token after the last position (prompt fully fed)
    sampling: SamplingParams  # seed is never None here: the engine resolved it
    # Earlier tokens of the sequence (prompt + outputs) are not needed by the model: they
    # are in the KV cache. The seeded RNG is keyed by (seed, start_pos + len(token_ids)),
    # the position of the token being sampled, which survives preemption, migration and
    # replay as prompt + delivered tokens.
    # The sampler's penalties, min_tokens and grammar need the tokens themselves: set (on
    # sampling chunks) only when `needs_history(sampling)`, else empty.
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()  # generated so far

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One token after some context (else a prefill chunk; the latency model's rule)."""
        return len(self.token_ids) == 1 and self.start_pos > 0


def needs_history(sampling: SamplingParams) -> bool:
    """The sampler reads the request's tokens: penalties, min_tokens, or a grammar (its
    matcher follows the output tokens)."""
    return sampling.has_penalties or sampling.min_tokens > 0 or sampling.has_grammar


class Sampled(list):
    """What an executor returns: the sampled token ids (a list, one per sampling chunk in
    chunk order) and, when any of those chunks asked for logprobs, `logprobs` (one entry
    per token, None where not asked). A plain list means no logprobs."""

    __slots__ = ("logprobs",)

    def __init__(self, token_ids=(), logprobs: list[TokenLogprobs | None] | None = None):
        super().__init__(token_ids)
        self.logprobs = logprobs


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelBatch:
    chunks: tuple[SeqChunk, ...]  # prefill chunks and decodes mixed, any order

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Executor(Protocol):
    """Runs a ModelBatch. Implementations: ModelRunner (real weights), SimExecutor."""

    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks this executor holds
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int  # longest sequence (prompt + output) the model supports
    # Honours SamplingParams' grammar (ModelRunner with a tokenizer); an executor without
    # the attribute does not, and the engine refuses such requests.
    supports_grammar: bool

    def execute(self, batch: ModelBatch) -> list[int]:
        """Run every chunk (writing its KV) and return one sampled token id per chunk
        with sample=True, in chunk order: a `Sampled` with the logprobs when a chunk's
        sampling asks for them."""
        ...
