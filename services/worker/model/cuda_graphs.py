"""CUDA graphs of the decode step: one token per request, batch padded up to a captured
size. Replaying a graph launches the whole forward (hundreds of kernels) at once, which
is what keeps small-batch decode GPU-bound instead of launch-bound.

Static device buffers hold the inputs; a replay copies the step's rows in and pads the
rest so they write their K/V into the runner's scratch block and attend to one token:

    row:            0 .. n-1 (real)           n .. bs-1 (padding)
    input_ids       the token                 0
    positions       seq_len - 1               0
    slot_mapping    its KV slot               pad_block * block_size
    seq_lens        its length                1
    block_tables    its blocks (first w cols) stale (unread: seq_len 1 needs column 0,
                                              a valid block id from an earlier step)

Graphs are captured per batch size *and* per context bucket (4k, 32k, max_model_len):
meta.max_seq_len is the bucket, so the attention backend must take per-request lengths
from the device tensors (seq_lens, block_tables) and use max_seq_len only as an upper
bound (it sizes the decode kernel's split-K); a step replays the smallest bucket
covering its longest request, so a short-context batch does not run the split count of
a 128k context. The torch reference reads host lists and is never captured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ferry.kernels.metadata import AttentionMetadata
from ferry.services.worker.model.llama import LlamaModel

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
CONTEXT_BUCKETS = (4096, 32768)  # plus max_model_len


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [num_blocks + 1, num_layers, 2, block_size, Hkv, D]
        *,
        batch_sizes: Sequence[int],
        block_size: int,
        pad_block_id: int,  # scratch block padding rows write to
        max_model_len: int,
        capture: bool = True,  # False: run the same static-buffer steps eagerly (tests)
    ) -> None:
        if not batch_sizes:
            raise ValueError("no batch sizes to capture")
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.max_batch_size = self.batch_sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.pad_slot = pad_block_id * block_size
        device = kv_cache.device
        max_bs = self.max_batch_size
        max_blocks_per_seq = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), self.pad_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (max_bs, max_blocks_per_seq), pad_block_id, dtype=torch.int32, device=device
        )
        self.hidden = torch.zeros(
            max_bs, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype, device=device
        )
        self.capture = capture
        self._pin = device.type == "cuda"
        self.len_buckets = tuple(sorted({min(b, max_model_len) for b in CONTEXT_BUCKETS}
                                        | {max_model_len}))
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch, bucket)
        if capture:
            self._capture_all()

    def padded_size(self, num_reqs: int) -> int | None:
        """Smallest captured batch size >= num_reqs, or None (run eagerly)."""
        for bs in self.batch_sizes:
            if bs >= num_reqs:
                return bs
        return None

    def run(
        self,
        token_ids: Sequence[int],  # [n] the one token of each request
        seq_lens: Sequence[int],  # [n] KV length after this step; position = len - 1
        block_ids: Sequence[Sequence[int]],  # n block tables, ragged
    ) -> torch.Tensor:  # [n, hidden] final hidden states (a view of a static buffer)
        num_reqs = len(token_ids)
        bs = self.padded_size(num_reqs)
        if bs is None:
            raise ValueError(
                f"{num_reqs} requests exceed the largest graph ({self.max_batch_size})"
            )
        num_pad = bs - num_reqs
        slots = [
            blocks[(n - 1) // self.block_size] * self.block_size + (n - 1) % self.block_size
            for blocks, n in zip(block_ids, seq_lens, strict=True)
        ]
        longs = self._host(  # [3, bs]: input_ids, positions, slot_mapping
            [
                [*token_ids, *[0] * num_pad],
                [*(n - 1 for n in seq_lens), *[0] * num_pad],
                [*slots, *[self.pad_slot] * num_pad],
            ],
            torch.int64,
        )
        needed = [-(-n // self.block_size) for n in seq_lens]  # blocks holding tokens
        width = max(needed)
        tables = self._host(
            [[*b[:k], *[0] * (width - k)] for b, k in zip(block_ids, needed, strict=True)],
            torch.int32,
        )
        self.input_ids[:bs].copy_(longs[0], non_blocking=True)
        self.positions[:bs].copy_(longs[1], non_blocking=True)
        self.slot_mapping[:bs].copy_(longs[2], non_blocking=True)
        self.seq_lens[:bs].copy_(
            self._host([*seq_lens, *[1] * num_pad], torch.int32), non_blocking=True
        )
        self.block_tables[:num_reqs, :width].copy_(tables, non_blocking=True)
        bucket = next(b for b in self.len_buckets if b >= max(seq_lens))
        if self.capture:
            self.graphs[bs, bucket].replay()
        else:
            self._forward(bs, self._meta(bs, bucket))
        return self.hidden[:num_reqs]

    def _host(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor, pinned on GPU so the copy from it runs asynchronously."""
        return torch.tensor(values, dtype=dtype, pin_memory=self._pin)

    def _meta(self, bs: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_query_len=1,
            max_seq_len=max_seq_len,  # an upper bound: lengths come from seq_lens
            query_lens_host=(1,) * bs,
            seq_lens_host=(max_seq_len,) * bs,
        )

    def _forward(self, bs: int, meta: AttentionMetadata) -> None:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, meta)
        self.hidden[:bs].copy_(hidden)

    def _capture_all(self) -> None:
        # Largest first, all in one memory pool: smaller graphs reuse the larger ones'
        # activation memory.
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.len_buckets):
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs, bucket)
                self._forward(bs, meta)  # warm-up: compiles / autotunes kernels uncaptured
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(bs, meta)
                self.graphs[bs, bucket] = graph
        torch.cuda.synchronize()
