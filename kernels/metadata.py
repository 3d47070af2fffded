"""Per-step attention metadata shared by every backend.

A step runs T query tokens from B requests, flattened request after request:

    q rows:   [ r0: q_len0 rows ][ r1: q_len1 rows ] ... ([T, Hq, D])
    query_start_loc = [0, q_len0, q_len0+q_len1, ..., T]

Request b already has `seq_lens[b] - q_len_b` tokens in its KV cache before this step;
its new tokens sit at positions seq_lens[b]-q_len_b .. seq_lens[b]-1 and attend
causally to every cached token and to the new ones at or before them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths, device
    seq_lens: torch.Tensor  # [B] int32, KV length after this step (cached + new), device
    block_tables: torch.Tensor  # [B, max_blocks] int32, physical block ids, device
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset per new token
    max_query_len: int  # max over b of q_len_b (host int, no sync needed)
    max_seq_len: int  # max over b of seq_lens[b] (host int)
    query_lens_host: tuple[int, ...]  # q_len_b on the host, for the torch reference
    seq_lens_host: tuple[int, ...]  # seq_lens on the host, for the torch reference

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
