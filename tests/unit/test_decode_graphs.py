"""The CUDA-graph decode path's bookkeeping on CPU: static buffers, padding rows, block
tables of varying widths, stale rows after a larger batch. Runs DecodeGraphs without
capturing (capture=False), with an attention that reads lengths from the device
tensors as a captured kernel must; the GPU test captures for real."""

from __future__ import annotations

import dataclasses
import random

import torch

from ferry.common.sampling import SamplingParams
from ferry.kernels.attention_torch import paged_attention_torch
from ferry.kernels.metadata import AttentionMetadata
from ferry.services.worker.model.cuda_graphs import DecodeGraphs
from ferry.services.worker.runner import ModelRunner, RunnerConfig
from tests.unit.model_helpers import FakeEngine
from tests.unit.test_runner import CONFIG


def paged_attention_device_lens(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The torch reference, lengths taken from meta's device tensors (its host lists
    are only upper bounds in a graph)."""
    seq_lens = tuple(meta.seq_lens.tolist())
    starts = meta.query_start_loc.tolist()
    meta = dataclasses.replace(
        meta,
        seq_lens_host=seq_lens,
        query_lens_host=tuple(b - a for a, b in zip(starts, starts[1:], strict=False)),
        max_seq_len=max(seq_lens),
    )
    return paged_attention_torch(q, k_cache, v_cache, meta, scale)


def test_graph_batches_equal_eager():
    num_blocks = 80
    eager = ModelRunner(
        RunnerConfig(model_config=CONFIG, seed=2, num_blocks=num_blocks, block_size=4)
    )
    graphed = ModelRunner(
        RunnerConfig(model_config=CONFIG, seed=2, num_blocks=num_blocks, block_size=4)
    )
    graphed.model.kernels = dataclasses.replace(
        graphed.model.kernels, paged_attention=paged_attention_device_lens
    )
    graphed.graphs = DecodeGraphs(
        graphed.model,
        graphed.kv_cache,
        batch_sizes=[1, 2, 4, 8],
        block_size=4,
        pad_block_id=graphed.pad_block_id,
        max_model_len=graphed.max_model_len,
        capture=False,
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(384) for _ in range(n)] for n in (3, 9, 14, 1, 22, 6, 17)]
    params = SamplingParams(temperature=0.9, seed=4)
    outputs = []
    for runner in (eager, graphed):
        engine = FakeEngine(runner, seed=5)  # same block ids for both runners
        reqs = [engine.add(f"r{i}", p) for i, p in enumerate(prompts)]
        for r in reqs:  # prefill all but the last prompt token, each alone (eager)
            if len(r.token_ids) > 1:
                engine.step([engine.chunk(r, len(r.token_ids) - 1, sample=False, sampling=params)])
        # Decode steps over changing subsets: 7 -> pads to 8, 3 -> 4 (rows 3.. stale from
        # the 8-batch), 1, 5 -> 8; one row does not sample.
        for subset in ([0, 1, 2, 3, 4, 5, 6], [4, 0, 2], [5], [6, 1, 3, 2, 0], [0, 1, 2, 3]):
            chunks = [engine.chunk(reqs[i], 1, sample=i != 3, sampling=params) for i in subset]
            tokens = iter(engine.step(chunks))
            for i, c in zip(subset, chunks, strict=True):
                reqs[i].token_ids.append(next(tokens) if c.sample else 7)
        outputs.append([r.token_ids for r in reqs])
    assert outputs[0] == outputs[1]
    # The engine's blocks hold the same KV; the scratch block took the padding writes.
    torch.testing.assert_close(graphed.kv_cache[:num_blocks], eager.kv_cache[:num_blocks])
    assert graphed.kv_cache[num_blocks].abs().sum() > 0
    assert eager.kv_cache[num_blocks].abs().sum() == 0
