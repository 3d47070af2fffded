"""ModelConfig: the Llama-family hyper-parameters Ferry's model needs, parsed from a
Hugging Face `config.json` (and `generation_config.json` for EOS ids when present).

Both RoPE spellings are accepted: the transformers 4.x `rope_theta` + `rope_scaling`
pair, and the transformers 5.x `rope_parameters` dict that holds `rope_theta` and the
scaling fields together.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# config.json written from a config class (not a model) may lack "architectures".
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

_SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
    """Llama 3.1 ("llama3") frequency-dependent RoPE scaling."""

    factor: float  # long-wavelength frequencies are divided by this
    low_freq_factor: float  # wavelengths above original_max / low_freq_factor are scaled
    high_freq_factor: float  # wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int  # context length the model was pre-trained on


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # MLP width
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    rope_theta: float
    rope_scaling: RopeScaling | None  # None: plain RoPE
    rms_norm_eps: float
    tie_word_embeddings: bool  # lm_head shares embed_tokens' weight
    qkv_bias: bool  # q/k/v projections have a bias (Qwen2; Llama with attention_bias)
    o_bias: bool  # o_proj has a bias (Llama with attention_bias)
    mlp_bias: bool  # gate/up/down projections have a bias (Llama with mlp_bias)
    max_position_embeddings: int
    sliding_window: int | None  # attention window when the model uses one, else None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        """Longest sequence served. Ferry's attention is full (no sliding window), so a
        windowed model is served only up to its window, where both agree exactly."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + self.hidden_size * self.o_bias
        mlp = 3 * self.hidden_size * self.intermediate_size
        mlp += (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * layer + self.hidden_size + head

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read `config.json`, and EOS ids from `generation_config.json` if present
        (that is what Hugging Face's `generate` stops on)."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} has no config.json")
        hf = json.loads(config_path.read_text())
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_hf_dict(hf, generation=gen)

    @classmethod
    def from_hf_dict(
        cls, hf: dict[str, Any], *, generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        architecture = _architecture(hf)
        num_heads = _require(hf, "num_attention_heads", int)
        hidden_size = _require(hf, "hidden_size", int)
        head_dim = hf.get("head_dim") or hidden_size // num_heads
        rope_theta, rope_scaling = _rope(hf)
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False))
        eos = (generation or {}).get("eos_token_id", hf.get("eos_token_id"))
        config = cls(
            architecture=architecture,
            vocab_size=_require(hf, "vocab_size", int),
            hidden_size=hidden_size,
            intermediate_size=_require(hf, "intermediate_size", int),
            num_layers=_require(hf, "num_hidden_layers", int),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=not is_qwen2 and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=_require(hf, "max_position_embeddings", int),
            sliding_window=_sliding_window(hf, architecture),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_ids(eos),
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError for shapes the model cannot run."""
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` Hugging Face would write for this model (transformers 5
        spelling: `rope_parameters`)."""
        model_type = {v: k for k, v in _ARCHITECTURE_BY_MODEL_TYPE.items()}[self.architecture]
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope = {
                "rope_theta": self.rope_theta,
                "rope_type": "llama3",
                **dataclasses.asdict(self.rope_scaling),
            }
        eos: int | list[int] | None = list(self.eos_token_ids) or None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }
        if self.architecture == "Qwen2ForCausalLM":
            if self.o_bias or not self.qkv_bias:
                raise ValueError("Qwen2 always has q/k/v bias and no o_proj bias")
        else:
            if self.qkv_bias != self.o_bias:
                raise ValueError("Llama/Mistral attention_bias covers q/k/v and o together")
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
            if self.architecture == "Qwen2ForCausalLM":
                hf["use_sliding_window"] = True
        elif self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = None
        return hf


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures")
    if archs:
        if len(archs) != 1:
            raise ValueError(f"expected one architecture in config.json, got {archs}")
        arch = archs[0]
    elif hf.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        arch = _ARCHITECTURE_BY_MODEL_TYPE[hf["model_type"]]
    else:
        raise ValueError(
            f"config.json names no supported architecture (architectures="
            f"{archs!r}, model_type={hf.get('model_type')!r}); supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either spelling:
    4.x: {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8, ...}}
    5.x: {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8, ...}}
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling is missing {e.args[0]!r}") from None
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return float(theta), scaling


def _sliding_window(hf: dict[str, Any], architecture: str) -> int | None:
    window = hf.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _require(hf: dict[str, Any], key: str, kind: type) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"config.json is missing {key!r}")
    value = hf[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"config.json {key!r} must be an integer, got {value!r}")
    return value
