"""make_model: presets, streamed safetensors shards, the tiny model end to end."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
import transformers
from safetensors import safe_open

from ferry.common.sampling import SamplingParams
from ferry.common.text import Tokenizer
from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.model.loader import build_random_model, load_model
from ferry.services.worker.model.make_model import (
    PRESETS,
    make_model,
    write_random_weights,
)
from ferry.services.worker.runner import ModelRunner, RunnerConfig
from tests.unit.model_helpers import FakeEngine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=3)


def test_preset_shapes():
    assert PRESETS["llama2-7b"].config.num_params == 6_738_415_616  # Llama 2 7B
    assert PRESETS["llama3-8b"].config.num_params == 8_030_261_248  # Llama 3.1 8B
    assert PRESETS["llama3-8b"].config.rope_scaling is not None
    tiny = PRESETS["tiny"].config
    assert tiny.num_kv_heads < tiny.num_heads  # GQA
    with pytest.raises(ValueError, match="unknown preset"):
        make_model("huge", "/nonexistent")


def test_tiny_files_load_and_equal_the_seeded_random_model(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    } <= names
    config = ModelConfig.from_dir(tiny_dir)
    assert config == PRESETS["tiny"].config
    loaded = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    built = build_random_model(config, device="cpu", dtype=torch.float32, seed=3)
    for (name, a), b in zip(loaded.named_parameters(), built.parameters(), strict=True):
        assert torch.equal(a, b), name
    tok = Tokenizer(tiny_dir)
    assert tok.vocab_size == config.vocab_size
    assert config.bos_token_id == tok.bos_token_id
    assert tok.token_to_id("<|eot_id|>") in config.eos_token_ids


def test_tiny_is_a_valid_transformers_checkpoint(tiny_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    runner = ModelRunner(RunnerConfig(model_dir=str(tiny_dir), num_blocks=16))
    ids = Tokenizer(tiny_dir).encode("import os\nprint(os.getcwd())")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    engine = FakeEngine(runner)
    req = engine.add("a", ids)
    chunk = engine.chunk(req, len(ids), sample=True, sampling=SamplingParams(temperature=0, seed=0))
    assert engine.step([chunk]) == [int(expected.argmax())]


def test_sharded_streamed_weights_round_trip(tmp_path):
    config = dataclasses.replace(PRESETS["tiny"].config, num_layers=2, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    write_random_weights(tmp_path, config, seed=9, dtype=torch.bfloat16, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with safe_open(str(tmp_path / files[0]), framework="pt") as f:
        name = next(iter(f.keys()))
        assert f.get_tensor(name).dtype == torch.bfloat16
    loaded = load_model(tmp_path, device="cpu", dtype=torch.bfloat16)
    built = build_random_model(config, device="cpu", dtype=torch.bfloat16, seed=9)
    for (name, a), b in zip(loaded.named_parameters(), built.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_generates_quickly(tiny_dir, capsys):
    """Batches of 1 and 8 requests decode through ModelRunner; prints tokens/s (no
    assertion on speed: machines differ). One torch thread, as a worker sharing a
    small CPU should run."""
    num_threads = torch.get_num_threads()
    try:
        runner = ModelRunner(RunnerConfig(model_dir=str(tiny_dir), num_blocks=256, cpu_threads=1))
        assert torch.get_num_threads() == 1
        report = [_decode_speed(runner, Tokenizer(tiny_dir), n) for n in (1, 8)]
    finally:
        torch.set_num_threads(num_threads)
    with capsys.disabled():
        print(f"\ntiny model, CPU fp32, 1 thread: {'; '.join(report)}")


def _decode_speed(runner: ModelRunner, tok: Tokenizer, batch_size: int, num_new: int = 48) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a haiku."}])
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    engine = FakeEngine(runner, seed=batch_size)
    reqs = [engine.add(f"r{i}", prompt_ids) for i in range(batch_size)]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i) for i in range(batch_size)]
    detoks = [tok.detokenizer(prompt_ids) for _ in reqs]
    texts = [""] * batch_size
    start = time.perf_counter()
    chunks = [
        engine.chunk(r, len(prompt_ids), sample=True, sampling=p)
        for r, p in zip(reqs, params, strict=True)
    ]
    for _ in range(num_new):
        tokens = engine.step(chunks)
        for i, (r, t) in enumerate(zip(reqs, tokens, strict=True)):
            r.token_ids.append(t)
            texts[i] += detoks[i].step([t])
        chunks = [
            engine.chunk(r, 1, sample=True, sampling=p) for r, p in zip(reqs, params, strict=True)
        ]
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == len(prompt_ids) + num_new for r in reqs)
    assert texts[0] + detoks[0].flush() == tok.decode(reqs[0].token_ids[len(prompt_ids) :],
                                                      skip_special_tokens=True)
    return f"batch {batch_size}: {batch_size * num_new / elapsed:.0f} tokens/s"
