"""The whole engine (local scheduler, block manager, ModelRunner) against transformers'
greedy `generate`, fp32 on CPU: a batch of prompts of different lengths, with a token
budget that splits prefills into chunks and a KV cache small enough that requests are
preempted and recomputed. The block invariant is checked after every step. Seeded
sampling gives the same tokens alone, in a batch, and after preemption."""

from __future__ import annotations

import random

import pytest
import torch

from ferry.common.config import EngineConfig
from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.runner import ModelRunner, RunnerConfig
from tests.unit.model_helpers import VOCAB_SIZE, make_hf_model, save_hf_model

PROMPT_LENS = (3, 9, 17, 30, 45, 61)
NUM_NEW = 14


def hf_greedy(hf, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.int64), max_new_tokens=num_tokens,
                          min_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_engine(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]
               ) -> dict[str, list[int]]:
    """Step to completion, checking the block invariant after every step."""
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p, arrival_s=float(i))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.first_index == len(out[o.req_id])
            out[o.req_id].extend(o.token_ids)
        engine.check_invariants()
    assert engine.blocks.num_available == engine.blocks.num_total
    return out


def make_engine(model_dir, *, num_blocks: int, budget: int) -> Engine:
    runner = ModelRunner(RunnerConfig(model_dir=str(model_dir), num_blocks=num_blocks,
                                      block_size=4))
    return Engine(runner, EngineConfig(max_num_batched_tokens=budget, max_num_seqs=16))


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True)],
                ids=["llama-gqa", "qwen2-tied"])
def model(request, tmp_path_factory):
    arch, tied = request.param
    hf = make_hf_model(arch, tied=tied, seed=11)
    model_dir = save_hf_model(hf, tmp_path_factory.mktemp(arch), shard=False)
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENS]
    expected = {f"r{i}": hf_greedy(hf, p, NUM_NEW) for i, p in enumerate(prompts)}
    return model_dir, prompts, expected


GREEDY = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(("num_blocks", "budget", "preempts"), [
    (256, 4096, False),  # everything at once
    (256, 8, False),  # prefills split into chunks of the 8-token budget
    (30, 16, True),  # 120 KV slots for ~250 tokens: preemption and recompute
], ids=["batch", "chunked", "preemption"])
def test_engine_greedy_equals_transformers(model, num_blocks, budget, preempts):
    model_dir, prompts, expected = model
    engine = make_engine(model_dir, num_blocks=num_blocks, budget=budget)
    assert run_engine(engine, prompts, [GREEDY] * len(prompts)) == expected
    assert (engine.scheduler.num_preemptions > 0) == preempts


def test_seeded_sampling_alone_batched_and_preempted(model):
    model_dir, prompts, _ = model
    params = [SamplingParams(max_tokens=NUM_NEW, temperature=1.0, top_p=0.9, seed=100 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    alone = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine = make_engine(model_dir, num_blocks=256, budget=4096)
        alone[f"r{i}"] = run_engine(engine, [prompt], [p])["r0"]
    batched = run_engine(make_engine(model_dir, num_blocks=256, budget=4096), prompts, params)
    tight = make_engine(model_dir, num_blocks=30, budget=16)
    preempted = run_engine(tight, prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert batched == alone
    assert preempted == alone
