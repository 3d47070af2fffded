"""Helpers for the model tests: tiny random Hugging Face checkpoints, and a minimal
stand-in for the engine that feeds requests through ModelRunner in chunks with
scrambled block tables."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from ferry.common.sampling import SamplingParams
from ferry.services.worker.engine.batch import ModelBatch, SeqChunk

VOCAB_SIZE = 512


def hf_config(arch: str, *, tied: bool) -> transformers.PretrainedConfig:
    """A tiny GQA config: Llama with Llama 3.1 RoPE scaling (original context short
    enough that scaling changes most frequencies), or Qwen2 (q/k/v bias)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if arch == "llama":
        return transformers.LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            **common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    raise ValueError(arch)


def make_hf_model(
    arch: str, *, tied: bool, seed: int = 0, std: float = 0.15
) -> transformers.PreTrainedModel:
    """A random fp32 HF model with weights large enough that attention is peaked (so a
    wrong position or mask shows in the logits), and non-trivial norms and biases."""
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    model = cls._from_config(hf_config(arch, tied=tied), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def save_hf_model(model: transformers.PreTrainedModel, out_dir: Path, *, shard: bool) -> Path:
    model.save_pretrained(out_dir, max_shard_size="40KB" if shard else "1GB")
    return out_dir


@dataclass
class Req:
    """One request as the fake engine tracks it."""

    req_id: str
    token_ids: list[int]  # prompt + generated so far
    num_computed: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)


class FakeEngine:
    """Plays the engine for ModelRunner: hands out blocks from a shuffled free list (so
    block tables are scrambled), feeds prompts in chunks of the given sizes, and
    batches every request together each step."""

    def __init__(self, runner, *, seed: int = 0) -> None:
        self.runner = runner
        self.free_blocks = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free_blocks)

    def add(self, req_id: str, prompt: list[int]) -> Req:
        return Req(req_id=req_id, token_ids=list(prompt))

    def chunk(
        self, req: Req, num_tokens: int, *, sample: bool, sampling: SamplingParams
    ) -> SeqChunk:
        """The next num_tokens uncomputed tokens of req, blocks allocated to cover them."""
        end = req.num_computed + num_tokens
        assert end <= len(req.token_ids)
        block_size = self.runner.block_size
        while len(req.block_ids) * block_size < end:
            req.block_ids.append(self.free_blocks.pop())
        chunk = SeqChunk(
            req_id=req.req_id,
            token_ids=tuple(req.token_ids[req.num_computed : end]),
            start_pos=req.num_computed,
            block_ids=tuple(req.block_ids),
            sample=sample,
            sampling=sampling,
        )
        req.num_computed = end
        return chunk

    def step(self, chunks: list[SeqChunk]) -> list[int]:
        return self.runner.execute(ModelBatch(chunks=tuple(chunks)))

    def free(self, req: Req) -> None:
        self.free_blocks.extend(req.block_ids)
        req.block_ids.clear()


def split(length: int, rng: random.Random, max_chunk: int) -> list[int]:
    """Random chunk sizes summing to length."""
    sizes = []
    while length:
        size = rng.randint(1, min(max_chunk, length))
        sizes.append(size)
        length -= size
    return sizes
