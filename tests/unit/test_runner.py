"""ModelRunner as an Executor: input layout, seeded sampling that does not depend on the
batch or on preemption, and its errors."""

from __future__ import annotations

import random

import pytest
import torch

from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk
from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.runner import ModelRunner, RunnerConfig, prepare_inputs
from tests.unit.model_helpers import FakeEngine, Req

CONFIG = ModelConfig.from_hf_dict(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "eos_token_id": [3, 4],
    }
)


def _runner(**kwargs) -> ModelRunner:
    return ModelRunner(RunnerConfig(model_config=CONFIG, seed=1, **({"num_blocks": 64} | kwargs)))


def _chunk(req_id, token_ids, start_pos, block_ids, sample=True, sampling=None) -> SeqChunk:
    return SeqChunk(
        req_id=req_id,
        token_ids=tuple(token_ids),
        start_pos=start_pos,
        block_ids=tuple(block_ids),
        sample=sample,
        sampling=sampling or SamplingParams(temperature=0.0, seed=0),
    )


def test_executor_attributes():
    runner = _runner(block_size=8)
    assert (runner.block_size, runner.num_blocks, runner.vocab_size) == (8, 64, 384)
    assert runner.eos_token_ids == (3, 4)
    assert runner.max_model_len == 128
    # one scratch block past the engine's
    assert runner.kv_cache.shape == (65, 2, 2, 8, 2, 16)
    assert runner.dtype == torch.float32 and runner.attention_backend == "torch"


def test_kv_cache_gb_sizes_the_cache():
    runner = _runner(num_blocks=None, kv_cache_gb=0.001)
    assert runner.block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    assert runner.num_blocks == int(0.001 * 2**30) // runner.block_bytes
    with pytest.raises(ValueError, match="num_blocks or kv_cache_gb"):
        _runner(num_blocks=None)


def test_prepare_inputs_layout():
    chunks = [
        _chunk("a", [11, 12, 13], start_pos=3, block_ids=[7, 2]),  # positions 3..5, bs 4
        _chunk("b", [21], start_pos=0, block_ids=[5, 9, 11]),  # more blocks than needed
    ]
    inputs = prepare_inputs(chunks, block_size=4, device=torch.device("cpu"))
    assert inputs.input_ids.tolist() == [11, 12, 13, 21]
    assert inputs.positions.tolist() == [3, 4, 5, 0]
    # pos 3 -> block 7 offset 3; pos 4, 5 -> block 2 offsets 0, 1; pos 0 -> block 5
    assert inputs.meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4, 2 * 4 + 1, 5 * 4]
    assert inputs.meta.query_start_loc.tolist() == [0, 3, 4]
    assert inputs.meta.seq_lens.tolist() == [6, 1]
    assert inputs.meta.block_tables.tolist() == [[7, 2], [5, 0]]
    assert (inputs.meta.max_query_len, inputs.meta.max_seq_len) == (3, 6)
    assert inputs.meta.query_lens_host == (3, 1) and inputs.meta.seq_lens_host == (6, 1)
    assert inputs.last_rows == (2, 3)
    assert inputs.meta.slot_mapping.dtype == torch.int64
    assert inputs.meta.block_tables.dtype == torch.int32


@pytest.mark.parametrize("num_reqs", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("q_len", [1, 2, 3])
def test_prepare_inputs_views_start_16_byte_aligned(num_reqs, q_len):
    """Triton specializes pointer arguments on 16-byte alignment: every view must start
    aligned whatever the step's token and request counts, or a step compiles a variant."""
    chunks = [_chunk(f"r{i}", [1] * q_len, start_pos=i, block_ids=[i, i + 1, i + 2])
              for i in range(num_reqs)]
    inputs = prepare_inputs(chunks, block_size=4, device=torch.device("cpu"))
    views = (inputs.input_ids, inputs.positions, inputs.meta.slot_mapping,
             inputs.meta.seq_lens, inputs.meta.query_start_loc, inputs.meta.block_tables)
    base = {}
    for view in views:  # offsets within each of the two buffers (one int64, one int32)
        base.setdefault(view.dtype, view.untyped_storage().data_ptr())
        assert (view.data_ptr() - base[view.dtype]) % 16 == 0
    assert inputs.meta.query_start_loc.tolist() == [q_len * i for i in range(num_reqs + 1)]
    assert inputs.meta.slot_mapping.numel() == num_reqs * q_len


def test_only_sampling_chunks_return_tokens_in_chunk_order():
    runner = _runner()
    batch = ModelBatch(
        chunks=(
            _chunk("a", range(5, 10), 0, [0], sample=False),
            _chunk("b", range(7, 20), 0, [1]),
            _chunk("c", [9], 0, [2]),
        )
    )
    out = runner.execute(batch)
    assert len(out) == 2 and all(0 <= t < 384 for t in out)
    assert runner.execute(ModelBatch(chunks=(_chunk("d", [1, 2], 0, [3], sample=False),))) == []
    # "b" alone samples what it sampled in the batch (second slot of the output)
    assert runner.execute(ModelBatch(chunks=(_chunk("b2", range(7, 20), 0, [4]),))) == [out[0]]


def _generate(
    engine: FakeEngine,
    reqs: list[Req],
    params: dict[str, SamplingParams],
    num_new: int,
    rng: random.Random,
) -> dict[str, list[int]]:
    """Run reqs to num_new tokens each, prefill in random chunks, all batched."""
    out: dict[str, list[int]] = {r.req_id: [] for r in reqs}
    while any(len(v) < num_new for v in out.values()):
        live = [r for r in reqs if len(out[r.req_id]) < num_new]
        chunks = []
        for r in live:
            todo = len(r.token_ids) - r.num_computed
            size = min(todo, rng.randint(1, 6))
            chunks.append(engine.chunk(r, size, sample=size == todo, sampling=params[r.req_id]))
        tokens = iter(engine.step(chunks))
        for r, c in zip(live, chunks, strict=True):
            if c.sample:
                token = next(tokens)
                out[r.req_id].append(token)
                r.token_ids.append(token)
    return out


def test_seeded_sampling_ignores_batch_and_preemption():
    runner = _runner(num_blocks=128)
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(384) for _ in range(n)] for i, n in enumerate([4, 19, 33])}
    params = {
        "r0": SamplingParams(temperature=1.0, seed=5),
        "r1": SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=6),
        "r2": SamplingParams(temperature=0.0, seed=7),
    }
    engine = FakeEngine(runner, seed=1)
    together = _generate(engine, [engine.add(k, v) for k, v in prompts.items()], params, 10, rng)
    assert len(set(together["r0"])) > 3  # really sampled
    for req_id, prompt in prompts.items():
        engine = FakeEngine(runner, seed=10 + int(req_id[1:]))
        alone = _generate(engine, [engine.add(req_id, prompt)], params, 10, rng)
        assert alone[req_id] == together[req_id], req_id
        # Preempted after 4 tokens: blocks freed, recomputed from prompt + those 4.
        engine = FakeEngine(runner, seed=3)
        req = engine.add(req_id, prompt + together[req_id][:4])
        resumed = _generate(engine, [req], params, 6, rng)
        assert together[req_id][:4] + resumed[req_id] == together[req_id], req_id
    # A different seed gives a different continuation.
    other = {"r0": SamplingParams(temperature=1.0, seed=55)}
    engine = FakeEngine(runner, seed=4)
    assert (
        _generate(engine, [engine.add("r0", prompts["r0"])], other, 10, rng)["r0"]
        != (together["r0"])
    )


def test_errors():
    runner = _runner(block_size=4)
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(ModelBatch(chunks=(_chunk("a", range(5), 0, [1]),)))
    with pytest.raises(ValueError, match="max_model_len"):
        runner.execute(ModelBatch(chunks=(_chunk("a", [1], 128, range(33)),)))
    with pytest.raises(ValueError, match="model_dir or model_config"):
        ModelRunner(RunnerConfig(num_blocks=4))
    with pytest.raises((ValueError, KeyError)):  # unknown attention backend
        ModelRunner(RunnerConfig(model_config=CONFIG, num_blocks=4, attention_backend="nope"))
    assert runner.execute(ModelBatch(chunks=())) == []


def test_logprobs_and_penalties_come_from_the_model_logits():
    """The runner's logprobs are log_softmax of the model's own logits at the sampled
    position (before penalties and temperature), and its penalties act on those logits."""
    runner = _runner()
    prompt, output = [5, 9, 11, 9, 40], [70, 70, 12]
    sequence = prompt + output
    with torch.inference_mode():
        inputs = prepare_inputs([_chunk("ref", sequence, 0, [20, 21])], block_size=16,
                                device=torch.device("cpu"))
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta)
        logits = runner.model.compute_logits(hidden[-1:])[0].double()
    reference = logits.log_softmax(dim=-1)
    params = SamplingParams(temperature=0.7, seed=3, logprobs=5, presence_penalty=1.5,
                            frequency_penalty=0.5, repetition_penalty=1.3)
    chunk = SeqChunk(req_id="a", token_ids=tuple(sequence), start_pos=0, block_ids=(0,),
                     sample=True, sampling=params, prompt_token_ids=tuple(prompt),
                     output_token_ids=tuple(output))
    out = runner.execute(ModelBatch(chunks=(chunk,)))
    (lp,) = out.logprobs
    assert lp.logprob == pytest.approx(reference[out[0]].item(), abs=1e-4)
    assert list(lp.top_token_ids) == reference.topk(5).indices.tolist()
    assert list(lp.top_logprobs) == pytest.approx(reference.topk(5).values.tolist(), abs=1e-4)
    # Greedy: the argmax of the penalized logits (repetition on the model's top token).
    top = int(logits.argmax())
    greedy = SamplingParams(temperature=0.0, seed=0)
    assert runner.execute(ModelBatch(chunks=(_chunk("g", sequence, 0, [1], sampling=greedy),))) \
        == [top]
    penalized = SamplingParams(temperature=0.0, seed=0, repetition_penalty=1e6)
    chunk = SeqChunk(req_id="p", token_ids=tuple(sequence), start_pos=0, block_ids=(2,),
                     sample=True, sampling=penalized, prompt_token_ids=(top,),
                     output_token_ids=())
    assert runner.execute(ModelBatch(chunks=(chunk,))) != [top]
