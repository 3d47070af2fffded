"""Executor `sim`: the real engine with model compute replaced by a fitted latency model.

Block accounting, local scheduling, load reports and migration control stay real; only
the forward pass is replaced. In a worker process each step sleeps for the modelled
time; the discrete-event simulator instead asks `step_time()` and advances a virtual
clock. Sampled tokens are a hash of (seed, position), never an EOS token, so output
lengths follow max_tokens (traces set ignore_eos anyway). Its "model" puts all mass on
that token: a request asking for logprobs gets 0.0 for it, and it alone as the top token.
"""

from __future__ import annotations

import time

from ferry.common.sampling import TokenLogprobs
from ferry.services.worker.engine.batch import ModelBatch, Sampled
from ferry.services.worker.latency_model import LatencyModel, Profile, StepFeatures

# Knuth's multiplicative hash constant; any odd 32-bit constant works.
_MIX = 2654435761


class SimExecutor:
    def __init__(
        self,
        latency: LatencyModel,
        *,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 32000,
        max_model_len: int = 8192,
        eos_token_ids: tuple[int, ...] = (2,),
        kv_block_bytes: int = 0,
        sleep: bool = True,
        speedup: float = 1.0,
    ) -> None:
        self.latency = latency
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.kv_block_bytes = kv_block_bytes  # what a migration would move per block
        self.sleep = sleep
        self.speedup = speedup  # >1 runs the modelled clock faster than real time
        self.kv_cache = None  # no tensors: migrations move control state only

    @classmethod
    def from_profile(
        cls, profile: Profile, *, num_blocks: int = 0, sleep: bool = True, speedup: float = 1.0,
        vocab_size: int = 0,
    ) -> SimExecutor:
        """vocab_size: the served model's, when it is not the profiled one's (the gateway
        detokenizes what the sim emits with the served model's tokenizer)."""
        return cls(
            profile.latency,
            num_blocks=num_blocks or profile.num_blocks,
            block_size=profile.block_size,
            vocab_size=vocab_size or profile.vocab_size,
            max_model_len=profile.max_model_len,
            kv_block_bytes=profile.kv_block_bytes,
            sleep=sleep,
            speedup=speedup,
        )

    def step_time(self, batch: ModelBatch) -> float:
        return self.latency.step_time(StepFeatures.of(batch))

    def execute(self, batch: ModelBatch) -> list[int]:
        if self.sleep:
            time.sleep(self.step_time(batch) / self.speedup)
        chunks = [c for c in batch.chunks if c.sample]
        token_ids = [self._token(c.sampling.seed or 0, c.end_pos) for c in chunks]
        if all(c.sampling.logprobs is None for c in chunks):
            return token_ids
        top = [min(c.sampling.logprobs or 0, 1) for c in chunks]
        return Sampled(token_ids, [
            None if c.sampling.logprobs is None else
            TokenLogprobs(logprob=0.0, top_token_ids=(t,) * k, top_logprobs=(0.0,) * k)
            for c, t, k in zip(chunks, token_ids, top, strict=True)])

    def _token(self, seed: int, position: int) -> int:
        token = ((seed * _MIX) ^ (position * 40503)) % self.vocab_size
        while token in self.eos_token_ids:
            token = (token + 1) % self.vocab_size
        return token

    def token_at(self, seed: int, position: int) -> int:
        """The token sampled at `position` (a chunk feeding positions [start, p) samples the
        token at p, so output index i of a request is at len(prompt) + i). Pure: replays and
        migrations yield the same tokens, and a client can check every one (bench/chaos_load.py)."""
        return self._token(seed, position)
