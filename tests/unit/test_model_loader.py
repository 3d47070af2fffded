"""Loading Hugging Face checkpoints: name mapping into fused weights, shards, dtype, and
clear errors for checkpoints that do not match their config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.model.loader import (
    build_random_model,
    hf_weight_shapes,
    load_model,
    random_hf_weight,
)
from tests.unit.model_helpers import make_hf_model, save_hf_model


def _hf_view(model) -> dict[str, torch.Tensor]:
    """Our model's weights under Hugging Face names, fused weights split back apart."""
    c = model.config
    ours = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": ours["embed_tokens.weight"],
        "model.norm.weight": ours["norm.weight"],
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(c.num_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{hp}{norm}.weight"] = ours[f"{p}{norm}.weight"]
        kinds = ["weight", "bias"] if c.qkv_bias else ["weight"]
        for kind in kinds:
            qkv = ours[f"{p}self_attn.qkv_proj.{kind}"].split([c.q_size, c.kv_size, c.kv_size])
            for proj, tensor in zip("qkv", qkv, strict=True):
                out[f"{hp}self_attn.{proj}_proj.{kind}"] = tensor
        out[f"{hp}self_attn.o_proj.weight"] = ours[f"{p}self_attn.o_proj.weight"]
        gate, up = ours[f"{p}mlp.gate_up_proj.weight"].chunk(2)
        out[f"{hp}mlp.gate_proj.weight"] = gate
        out[f"{hp}mlp.up_proj.weight"] = up
        out[f"{hp}mlp.down_proj.weight"] = ours[f"{p}mlp.down_proj.weight"]
    return out


@pytest.mark.parametrize(
    ("arch", "tied", "shard"),
    [
        ("llama", False, True),
        ("llama", True, False),
        ("qwen2", False, False),
        ("qwen2", True, True),
    ],
)
def test_round_trip_equals_transformers_weights(tmp_path, arch, tied, shard):
    hf = make_hf_model(arch, tied=tied)
    save_hf_model(hf, tmp_path, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    model = load_model(tmp_path, device="cpu", dtype=torch.float32)
    hf_state = hf.state_dict()
    ours = _hf_view(model)
    assert set(ours) == set(hf_weight_shapes(model.config))
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf_state[name]), name
    if tied:
        assert model.lm_head is None


def test_loads_into_bf16(tmp_path):
    hf = make_hf_model("llama", tied=False)
    save_hf_model(hf, tmp_path, shard=False)
    model = load_model(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rotary.cos_sin.dtype == torch.float32
    hf_state = hf.state_dict()
    for name, tensor in _hf_view(model).items():
        assert torch.equal(tensor, hf_state[name].to(torch.bfloat16)), name


def _edit_checkpoint(tmp_path, edit) -> None:
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "missing model.layers.1.mlp.up_proj.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
            "unexpected model.layers.0.extra.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
            r"k_proj.weight has shape \(16, 64\), the config expects \(32, 64\)",
        ),
    ],
)
def test_mismatched_checkpoint_errors(tmp_path, edit, message):
    save_hf_model(make_hf_model("llama", tied=False), tmp_path, shard=False)
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path, device="cpu", dtype=torch.float32)


def test_tied_checkpoint_may_carry_lm_head_and_old_rope_buffers(tmp_path):
    save_hf_model(make_hf_model("llama", tied=True), tmp_path, shard=False)

    def add_extras(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _edit_checkpoint(tmp_path, add_extras)
    load_model(tmp_path, device="cpu", dtype=torch.float32)


def test_missing_weight_files(tmp_path):
    save_hf_model(make_hf_model("llama", tied=False), tmp_path, shard=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(ValueError, match="missing weight files"):
        load_model(tmp_path, device="cpu", dtype=torch.float32)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        load_model(tmp_path, device="cpu", dtype=torch.float32)


def test_random_model_is_a_pure_function_of_seed():
    config = ModelConfig.from_hf_dict(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 300,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        }
    )
    a = build_random_model(config, device="cpu", dtype=torch.float32, seed=3)
    b = build_random_model(config, device="cpu", dtype=torch.float32, seed=3)
    c = build_random_model(config, device="cpu", dtype=torch.float32, seed=4)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name and "bias" not in name:
            assert not torch.equal(pa, pc), name
    assert torch.equal(
        a.layers[1].mlp.gate_up_proj.weight[48:],
        random_hf_weight("model.layers.1.mlp.up_proj.weight", (48, 32), seed=3),
    )
