"""Test doubles for the engine core.

TokenKVExecutor keeps a "KV cache" of token ids ([num_blocks, block_size] int64) and
computes each next token from the whole sequence it reads back through the block table.
A wrong block table, a lost or stale block, or a bad migration copy changes its output,
so comparing runs against an undisturbed reference checks the engine's KV bookkeeping
end to end, without a model.
"""

from __future__ import annotations

import torch

from ferry.services.worker.engine.batch import ModelBatch

EMPTY = -1
PRIME = 1_000_003


class TokenKVExecutor:
    def __init__(
        self,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        vocab_size: int = 97,
        eos_token_ids: tuple[int, ...] = (0,),
        max_model_len: int = 4096,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.kv_cache = torch.full((num_blocks, block_size), EMPTY, dtype=torch.int64)
        self.num_calls = 0
        self.batch_sizes: list[int] = []

    def execute(self, batch: ModelBatch) -> list[int]:
        self.num_calls += 1
        self.batch_sizes.append(len(batch.chunks))
        sampled = []
        for chunk in batch.chunks:
            assert len(chunk.block_ids) * self.block_size >= chunk.end_pos, "table too short"
            for i, token in enumerate(chunk.token_ids):
                pos = chunk.start_pos + i
                self.kv_cache[chunk.block_ids[pos // self.block_size], pos % self.block_size] = token
            if chunk.sample:
                sequence = self._read(chunk.block_ids, chunk.end_pos)
                sampled.append(self._next_token(sequence, chunk))
        return sampled

    def _read(self, block_ids: tuple[int, ...], length: int) -> list[int]:
        rows = self.kv_cache[list(block_ids)].reshape(-1)[:length].tolist()
        assert EMPTY not in rows, "read a KV slot that was never written"
        return rows

    def _next_token(self, sequence: list[int], chunk) -> int:
        digest = 0
        for pos, token in enumerate(sequence):
            digest = (digest * 31 + token * (pos + 7)) % PRIME
        if not chunk.sampling.is_greedy:
            digest = (digest * 131 + chunk.sampling.seed * 17 + chunk.end_pos) % PRIME
        return digest % self.vocab_size


class SamplerKVExecutor(TokenKVExecutor):
    """TokenKVExecutor whose tokens come from the real sampler (services/worker/sampler.py):
    each row's logits are a pseudo-random function of the whole sequence read back through
    the block table, then penalties, bias, min_tokens, temperature and the seeded draw run
    as on a real worker, from the chunk's token history. A request whose penalty state
    were derived differently after a migration or a replay would sample differently."""

    def execute(self, batch: ModelBatch) -> list[int]:
        from ferry.services.worker.engine.batch import Sampled, needs_history
        from ferry.services.worker.sampler import (
            SamplingTensors,
            TokenHistory,
            run_sampler,
            token_logprobs,
        )

        self.num_calls += 1
        self.batch_sizes.append(len(batch.chunks))
        rows, chunks = [], []
        for chunk in batch.chunks:
            for i, token in enumerate(chunk.token_ids):
                pos = chunk.start_pos + i
                self.kv_cache[chunk.block_ids[pos // self.block_size], pos % self.block_size] = token
            if chunk.sample:
                digest = 0
                for pos, token in enumerate(self._read(chunk.block_ids, chunk.end_pos)):
                    digest = (digest * 31 + token * (pos + 7)) % PRIME
                gen = torch.Generator().manual_seed(digest)
                rows.append(torch.randn(self.vocab_size, generator=gen) * 2)
                chunks.append(chunk)
        if not chunks:
            return Sampled()
        params = [c.sampling for c in chunks]
        st = SamplingTensors.build(
            params, [c.end_pos for c in chunks], vocab_size=self.vocab_size, device="cpu",
            histories=[TokenHistory(c.prompt_token_ids, c.output_token_ids)
                       if needs_history(c.sampling) else None for c in chunks],
            eos_token_ids=self.eos_token_ids)
        out = run_sampler(torch.stack(rows), st)
        if out.logprobs is None:
            return Sampled(out.token_ids.tolist())
        return Sampled(out.token_ids.tolist(), token_logprobs(out, st, params))
