"""Ferry's model against transformers, in fp32 on CPU: logits through the paged KV cache
(scrambled block tables, prefill in chunks, several requests per step, then decode
steps), and greedy generation through ModelRunner.execute."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import SeqChunk
from ferry.services.worker.model.loader import load_model
from ferry.services.worker.runner import ModelRunner, RunnerConfig, prepare_inputs
from tests.unit.model_helpers import VOCAB_SIZE, FakeEngine, make_hf_model, save_hf_model, split

GREEDY = SamplingParams(temperature=0.0, seed=0)
CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


def _logits_of_chunks(runner: ModelRunner, chunks: list[SeqChunk]) -> list[torch.Tensor]:
    """Logits of every row of a step ([len(chunk), vocab] per chunk), KV written."""
    inputs = prepare_inputs(chunks, block_size=runner.block_size, device=runner.device)
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta)
        logits = runner.model.compute_logits(hidden)
    return list(logits.split([len(c.token_ids) for c in chunks]))


def _hf_logits(hf, token_ids: list[int], *, gap: bool = False) -> torch.Tensor:
    """HF logits; gap=True skips position 1 (positions 0, 2, 3, ...), which changes
    every distance to the first token (a uniform shift would change nothing: RoPE is
    relative)."""
    ids = torch.tensor([token_ids])
    positions = torch.arange(len(token_ids))[None]
    if gap:
        positions[:, 1:] += 1
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=positions).logits[0].float()


@pytest.mark.parametrize(("arch", "tied"), CASES)
def test_logits_match_transformers(tmp_path, arch, tied):
    hf = make_hf_model(arch, tied=tied, seed=1)
    model_dir = save_hf_model(hf, tmp_path, shard=arch == "llama")
    runner = ModelRunner(RunnerConfig(model_dir=str(model_dir), num_blocks=64, block_size=4))
    engine = FakeEngine(runner, seed=2)
    rng = random.Random(3)
    prompt_lens = [1, 5, 17, 40]
    num_decode_steps = 3
    reqs = [
        engine.add(f"r{i}", [rng.randrange(VOCAB_SIZE) for _ in range(n + num_decode_steps)])
        for i, n in enumerate(prompt_lens)
    ]
    logits: dict[str, list[torch.Tensor]] = {r.req_id: [] for r in reqs}
    # Prefill: step k runs the k-th chunk of every prompt that still has one, in a
    # shuffled order; then decode steps feed one (teacher-forced) token each.
    plans = {r.req_id: split(n, rng, max_chunk=12) for r, n in zip(reqs, prompt_lens, strict=True)}
    plans = {k: v + [1] * num_decode_steps for k, v in plans.items()}
    for step in range(max(len(p) for p in plans.values())):
        step_reqs = [r for r in reqs if step < len(plans[r.req_id])]
        rng.shuffle(step_reqs)
        chunks = [
            engine.chunk(r, plans[r.req_id][step], sample=False, sampling=GREEDY) for r in step_reqs
        ]
        for r, out in zip(step_reqs, _logits_of_chunks(runner, chunks), strict=True):
            logits[r.req_id].append(out)

    for r in reqs:
        ours = torch.cat(logits[r.req_id])
        theirs = _hf_logits(hf, r.token_ids)
        assert ours.shape == theirs.shape == (len(r.token_ids), VOCAB_SIZE)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        # The comparison can fail: wrong relative positions move the logits a lot.
        if len(r.token_ids) > 8:
            assert (ours - _hf_logits(hf, r.token_ids, gap=True)).abs().max() > 1e-2


def test_rope_scaling_is_applied(tmp_path):
    hf = make_hf_model("llama", tied=False, seed=4)
    model_dir = save_hf_model(hf, tmp_path, shard=False)
    token_ids = list(range(3, 60))
    expected = _hf_logits(hf, token_ids)
    for scaled in (True, False):
        model = load_model(model_dir, device="cpu", dtype=torch.float32)
        if not scaled:  # the same weights with plain RoPE must not match
            config = dataclasses.replace(model.config, rope_scaling=None)
            model.config = config
            model.rotary.config = config
            model.rotary.reset_cache()
        runner = ModelRunner(RunnerConfig(model_dir=str(model_dir), num_blocks=8))
        runner.model = model
        chunk = SeqChunk(
            req_id="a",
            token_ids=tuple(token_ids),
            start_pos=0,
            block_ids=tuple(range(4)),
            sample=False,
            sampling=GREEDY,
        )
        (ours,) = _logits_of_chunks(runner, [chunk])
        diff = (ours - expected).abs().max().item()
        assert (diff < 1e-4) if scaled else (diff > 1e-2), (scaled, diff)


def _hf_greedy(hf, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True)])
def test_greedy_generation_matches_transformers(tmp_path, arch, tied):
    hf = make_hf_model(arch, tied=tied, seed=5)
    model_dir = save_hf_model(hf, tmp_path, shard=False)
    runner = ModelRunner(RunnerConfig(model_dir=str(model_dir), num_blocks=96))
    engine = FakeEngine(runner, seed=6)
    rng = random.Random(7)
    prompt_lens = [3, 9, 16, 30, 45]
    num_new = 12
    prompts = [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in prompt_lens]
    reqs = [engine.add(f"r{i}", p) for i, p in enumerate(prompts)]
    generated: dict[str, list[int]] = {r.req_id: [] for r in reqs}
    # Request i arrives at step i; a step mixes decodes with prefill chunks (<= 8 tokens).
    step = 0
    while any(len(g) < num_new for g in generated.values()):
        live = [r for i, r in enumerate(reqs[: step + 1]) if len(generated[r.req_id]) < num_new]
        chunks = []
        for r in live:
            todo = len(r.token_ids) - r.num_computed
            size = min(todo, rng.randint(1, 8))
            chunks.append(engine.chunk(r, size, sample=size == todo, sampling=GREEDY))
        sampled = iter(engine.step(chunks))
        for r, c in zip(live, chunks, strict=True):
            if c.sample:
                token = next(sampled)
                generated[r.req_id].append(token)
                r.token_ids.append(token)
        step += 1
    for r, prompt in zip(reqs, prompts, strict=True):
        assert generated[r.req_id] == _hf_greedy(hf, prompt, num_new), r.req_id
