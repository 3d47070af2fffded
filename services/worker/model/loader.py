"""Load a Hugging Face Llama-family checkpoint, or build a seeded random model.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards
listed in `model.safetensors.index.json`. Tensors are read one at a time straight onto
the target device, cast to the target dtype, and copied into place; q/k/v and gate/up
land in row ranges of the fused `qkv_proj` / `gate_up_proj`:

    qkv_proj.weight rows:     [ q_proj: Hq*D | k_proj: Hkv*D | v_proj: Hkv*D ]
    gate_up_proj.weight rows: [ gate_proj: I | up_proj: I ]

Random weights are a pure function of (seed, Hugging Face tensor name), so a model
written by make_model.py and loaded here equals `build_random_model` with that seed.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from ferry.kernels.backend import FusedOps
from ferry.services.worker.model.config import ModelConfig
from ferry.services.worker.model.llama import LlamaModel, PagedAttention, WriteKV, build_empty_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
INIT_STD = 0.02  # Hugging Face's initializer_range default, used for random weights

# Tensors some checkpoints carry that the model recomputes (old RoPE buffers).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)")


def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, name -> shape,
    in the order Hugging Face writes them."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size)
    }
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        for proj, rows in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, c.hidden_size)
            if c.qkv_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, c.q_size)
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        for proj in ("gate", "up"):
            shapes[f"{p}mlp.{proj}_proj.weight"] = (c.intermediate_size, c.hidden_size)
            if c.mlp_bias:
                shapes[f"{p}mlp.{proj}_proj.bias"] = (c.intermediate_size,)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
        if c.mlp_bias:
            shapes[p + "mlp.down_proj.bias"] = (c.hidden_size,)
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def load_model(
    model_dir: str | Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    attention: tuple[WriteKV, PagedAttention] | None = None,
    ops: FusedOps | None = None,
    max_model_len: int | None = None,
) -> LlamaModel:
    """Read config.json and the safetensors weights of model_dir onto device/dtype."""
    config = ModelConfig.from_dir(model_dir)
    model = build_empty_model(
        config, device=device, dtype=dtype, attention=attention, ops=ops,
        max_model_len=max_model_len,
    )
    load_weights(model, model_dir)
    return model


def load_weights(model: LlamaModel, model_dir: str | Path) -> None:
    """Fill every parameter of model from the checkpoint; raise ValueError naming the
    missing, unexpected or mis-shaped tensors."""
    config = model.config
    expected = hf_weight_shapes(config)
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if name not in expected:
                    if not _is_ignored(name, config):
                        unexpected.append(name)
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(
                        f"{path.name}: tensor {name} has shape {shape}, the config "
                        f"expects {expected[name]}"
                    )
                if name in loaded:
                    raise ValueError(f"tensor {name} appears in more than one file")
                _target(params, name, config).copy_(f.get_tensor(name))
                loaded.add(name)
    missing = [n for n in expected if n not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not match its config: "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}"
        )


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise ValueError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ValueError(f"{model_dir} is missing weight files {absent}")
    return files


def random_hf_weight(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 CPU tensor `name` of a random checkpoint: norms 1, biases 0 (as Hugging
    Face initialises them), everything else N(0, INIT_STD^2) from a generator keyed by
    (seed, name), so each tensor can be made alone and in any order."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator).mul_(INIT_STD)


def build_random_model(
    config: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    attention: tuple[WriteKV, PagedAttention] | None = None,
    ops: FusedOps | None = None,
    max_model_len: int | None = None,
    on_device: bool = False,
) -> LlamaModel:
    """A model with `random_hf_weight` weights (what make_model writes for this seed).
    on_device: draw the weights with the device's own generator instead (same
    distribution, other values): seconds instead of minutes for 8B parameters on a GPU,
    for benchmarks that need the shape, not make_model's exact weights."""
    model = build_empty_model(
        config, device=device, dtype=dtype, attention=attention, ops=ops,
        max_model_len=max_model_len,
    )
    if on_device:
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, INIT_STD, generator=generator)
        return model
    params = dict(model.named_parameters())
    for name, shape in hf_weight_shapes(config).items():
        _target(params, name, config).copy_(random_hf_weight(name, shape, seed))
    return model


def _target(params: dict[str, torch.nn.Parameter], name: str, config: ModelConfig) -> torch.Tensor:
    """The parameter (or fused row range of one) that HF tensor `name` fills."""
    if name == "lm_head.weight":
        return params["lm_head.weight"]
    assert name.startswith("model."), name
    match = _LAYER_NAME.fullmatch(name)
    if match is None:  # embed_tokens, norms: same name without "model."
        return params[name.removeprefix("model.")]
    layer, block, proj, kind = match.groups()
    prefix = f"layers.{layer}.{block}."
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    fused = {
        "q": ("qkv_proj", 0, q),
        "k": ("qkv_proj", q, kv),
        "v": ("qkv_proj", q + kv, kv),
        "gate": ("gate_up_proj", 0, inter),
        "up": ("gate_up_proj", inter, inter),
    }
    if proj not in fused:  # o_proj, down_proj
        return params[f"{prefix}{proj}_proj.{kind}"]
    fused_name, start, num_rows = fused[proj]
    return params[f"{prefix}{fused_name}.{kind}"].narrow(0, start, num_rows)


def _is_ignored(name: str, config: ModelConfig) -> bool:
    # A tied checkpoint may still carry lm_head.weight (a copy of embed_tokens).
    return bool(_IGNORED.fullmatch(name)) or (
        name == "lm_head.weight" and config.tie_word_embeddings
    )


def _some(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
