"""ModelConfig parsing: both RoPE spellings, architectures, EOS sources, errors."""

from __future__ import annotations

import json

import pytest
import transformers

from ferry.services.worker.model.config import ModelConfig, RopeScaling

LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama31_v4() -> dict:
    """A Llama 3.1 8B config.json as transformers 4.x wrote it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING},
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }


def test_llama31_transformers4_spelling():
    c = ModelConfig.from_hf_dict(_llama31_v4())
    assert c.architecture == "LlamaForCausalLM"
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling(**LLAMA3_SCALING)
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert c.bos_token_id == 128000
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias or c.tie_word_embeddings)
    assert c.max_model_len == 131072
    assert c.num_params == 8_030_261_248  # Llama 3.1 8B's published count


def test_transformers5_rope_parameters_spelling(tmp_path):
    hf = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING},
    )
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    c = ModelConfig.from_dir(tmp_path)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling(**LLAMA3_SCALING)
    assert c.head_dim == 16
    assert c.architecture == "LlamaForCausalLM"  # from model_type: no "architectures" key


def test_both_spellings_parse_the_same():
    v4 = _llama31_v4()
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}
    assert ModelConfig.from_hf_dict(v4) == ModelConfig.from_hf_dict(v5)


def test_to_hf_dict_round_trips():
    c = ModelConfig.from_hf_dict(_llama31_v4())
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c


def test_default_rope_and_explicit_head_dim():
    hf = _llama31_v4()
    hf.pop("rope_scaling")
    hf["head_dim"] = 96  # explicit head_dim wins over hidden / heads
    c = ModelConfig.from_hf_dict(hf)
    assert c.rope_scaling is None and c.head_dim == 96 and c.q_size == 32 * 96


def test_qwen2_has_qkv_bias_and_ignores_unused_window(tmp_path):
    transformers.Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        sliding_window=4096,
        use_sliding_window=False,
    ).save_pretrained(tmp_path)
    c = ModelConfig.from_dir(tmp_path)
    assert c.architecture == "Qwen2ForCausalLM"
    assert c.qkv_bias and not c.o_bias
    assert c.tie_word_embeddings
    assert c.sliding_window is None and c.max_model_len == 32768


def test_mistral_window_caps_max_model_len():
    hf = {**_llama31_v4(), "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    hf.pop("rope_scaling")
    hf["sliding_window"] = 4096
    c = ModelConfig.from_hf_dict(hf)
    assert c.sliding_window == 4096 and c.max_model_len == 4096


def test_generation_config_eos_wins(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_llama31_v4(), "eos_token_id": 128001}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (128001,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (7, 9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"architectures": None, "model_type": "gpt2"}, "no supported architecture"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"hidden_size": "4096"}, "hidden_size"),
        ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_clear_errors(change, message):
    hf = {**_llama31_v4(), **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(hf)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
