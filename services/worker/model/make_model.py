"""Make a random-weight model directory Ferry (and Hugging Face) can load, offline.

    python -m ferry.services.worker.model.make_model tiny /tmp/tiny [--seed 0]

Writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
the weights as safetensors (one file, or shards plus model.safetensors.index.json).
The tokenizer is a byte-level BPE trained here on Python's own standard library
sources (cached after the first run), padded with reserved special tokens up to the
model's vocab size so every id decodes. Weights are `random_hf_weight(name, seed)`
(loader.py), written one tensor at a time: making an 8B model needs one tensor's worth
of memory, not the model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ferry.services.worker.model.config import ModelConfig, RopeScaling
from ferry.services.worker.model.loader import (
    INDEX_FILE,
    SINGLE_FILE,
    hf_weight_shapes,
    random_hf_weight,
)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"  # ends a chat turn; also an EOS id
# Ids 0..4, the same in every preset.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN)
BPE_VOCAB_SIZE = 4096  # trained tokens, specials included; the rest up to vocab is reserved
TRAIN_CORPUS_CHARS = 4_000_000  # of stdlib source; trains in about a second

# Llama 3.1's template, its JSON tool calling kept (tools in the first user message,
# calls as {"name": ..., "parameters": {...}}, results in "ipython" turns); without the
# system preamble (dates, builtin tools) and with the roles rendered as given.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(tools_shown=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] in ('tool', 'ipython') %}"
    "<|start_header_id|>ipython<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined"
    " and message['tool_calls'] %}"
    "{% if message['tool_calls'] | length != 1 %}"
    "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
    "{% set call = message['tool_calls'][0]['function'] %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "{{ call[\'name\'] }}", "parameters": {{ call[\'arguments\'] | tojson }}}'
    "<|eot_id|>"
    "{% else %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if tools and message['role'] == 'user' and not ns.tools_shown %}"
    "{% set ns.tools_shown = true %}"
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}. Do not use variables.\n\n"
    "{% for tool in tools %}{{ tool | tojson(indent=4) }}\n\n{% endfor %}"
    "{% endif %}"
    "{{ message['content'] }}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_LLAMA = dict(
    architecture="LlamaForCausalLM",
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    sliding_window=None,
    bos_token_id=0,
    eos_token_ids=(1, 4),
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    config: ModelConfig
    dtype: torch.dtype  # of the written weights
    max_shard_bytes: int  # one safetensors file up to this size


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        config=ModelConfig(
            **_LLAMA,
            vocab_size=BPE_VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=768,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=32,
            rope_theta=10000.0,
            rope_scaling=None,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
        dtype=torch.float32,
        max_shard_bytes=1 << 30,
    ),
    "llama2-7b": Preset(
        config=ModelConfig(
            **_LLAMA,
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            rope_theta=10000.0,
            rope_scaling=None,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
        dtype=torch.bfloat16,
        max_shard_bytes=4 << 30,
    ),
    "llama3-8b": Preset(
        config=ModelConfig(
            **_LLAMA,
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
        ),
        dtype=torch.bfloat16,
        max_shard_bytes=4 << 30,
    ),
}


def make_model(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    num_layers: int | None = None,
    cache_dir: str | Path | None = None,
    weights: bool = True,
) -> Path:
    """Write a random model of `preset` (a key of PRESETS) to out_dir and return it.
    num_layers overrides the preset's depth (full widths, fewer layers: quick tests).
    weights=False writes the config and tokenizer only: what a gateway reads of a
    "random:PRESET" cluster, whose workers draw their weights on the device."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    config = spec.config
    if num_layers is not None:
        config = dataclasses.replace(config, num_layers=num_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(
        out_dir / "config.json",
        {**config.to_hf_dict(), "torch_dtype": str(spec.dtype).removeprefix("torch.")},
    )
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)},
    )
    write_tokenizer(
        out_dir,
        vocab_size=config.vocab_size,
        model_max_length=config.max_model_len,
        cache_dir=cache_dir,
    )
    if weights:
        write_random_weights(
            out_dir, config, seed=seed, dtype=spec.dtype, max_shard_bytes=spec.max_shard_bytes
        )
    return out_dir


def write_tokenizer(
    out_dir: Path, *, vocab_size: int, model_max_length: int, cache_dir: str | Path | None = None
) -> None:
    """tokenizer.json (trained BPE, reserved tokens up to vocab_size, a post-processor
    that prepends BOS, as Llama 3's does) and tokenizer_config.json (BOS/EOS, chat
    template)."""
    if vocab_size < BPE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {BPE_VOCAB_SIZE}, got {vocab_size}")
    tok = tokenizers.Tokenizer.from_file(str(trained_bpe_path(cache_dir)))
    num_reserved = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(num_reserved)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    bos_id = SPECIAL_TOKENS.index(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def trained_bpe_path(cache_dir: str | Path | None = None) -> Path:
    """The BPE tokenizer (BPE_VOCAB_SIZE tokens) trained on stdlib sources, trained
    on first use and cached under cache_dir (default ~/.cache/ferry)."""
    files = _corpus_files()
    key = hashlib.sha256(
        json.dumps(
            [
                BPE_VOCAB_SIZE,
                SPECIAL_TOKENS,
                TRAIN_CORPUS_CHARS,
                tokenizers.__version__,
                [(f.name, f.stat().st_size) for f in files],
            ]
        ).encode()
    ).hexdigest()[:16]
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = cache_dir / f"bpe-{BPE_VOCAB_SIZE}-{key}.json"
    if path.is_file():
        return path
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        (f.read_text(encoding="utf-8", errors="replace") for f in files), trainer
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent makers never read half a file
    return path


def write_random_weights(
    out_dir: Path, config: ModelConfig, *, seed: int, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """Every tensor of hf_weight_shapes(config), streamed into safetensors shards."""
    shapes = hf_weight_shapes(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        num_bytes = _numel(shape) * itemsize
        if shards[-1] and shard_bytes + num_bytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += num_bytes
    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:
        file_names = [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
    for file_name, names in zip(file_names, shards, strict=True):
        write_safetensors_streaming(
            out_dir / file_name,
            {name: shapes[name] for name in names},
            dtype,
            lambda name: random_hf_weight(name, shapes[name], seed),
        )
    if len(shards) > 1:
        total = sum(_numel(s) for s in shapes.values()) * itemsize
        weight_map = {n: f for f, names in zip(file_names, shards, strict=True) for n in names}
        _write_json(
            out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )


def write_safetensors_streaming(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make_tensor
) -> None:
    """A safetensors file whose tensors are made (make_tensor(name) -> CPU tensor) and
    written one at a time. Layout: u64 little-endian header length, JSON header
    (names -> dtype, shape, byte offsets into the data), then the raw data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + _numel(shape) * itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, shape in shapes.items():
            tensor = make_tensor(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made shape {tuple(tensor.shape)}, declared {shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)


_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _corpus_files() -> list[Path]:
    """Stdlib .py files, sorted, up to TRAIN_CORPUS_CHARS of text (by file size)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        files.append(path)
        total += path.stat().st_size
        if total >= TRAIN_CORPUS_CHARS:
            break
    if not files:
        raise RuntimeError(f"no Python sources under {stdlib} to train a tokenizer on")
    return files


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ferry"


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry make-model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", dest="out_dir", type=Path, required=True,
                        help="directory to write (config.json, tokenizer, safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="override the preset's depth (keeps its widths)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    make_model(args.preset, args.out_dir, args.seed, num_layers=args.num_layers)
    print(
        f"wrote {args.preset} to {args.out_dir} in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
