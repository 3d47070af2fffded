"""The gateway's text side (common/text.py TextModel: encode, chat template, incremental
detokenization, limits) on a tiny tokenizer trained here (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from ferry.common import text as text_module
from ferry.common.text import TextModel

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "Hello there! How are you today? I am fine, thank you.",
    "stop here. STOP. the end is near; the end.",
    "numbers 0123456789 and symbols +-*/=<>",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}"
)
MAX_MODEL_LEN = 256
BOS, EOS = "<s>", "</s>"


def make_model_dir(path: Path, *, max_model_len: int = MAX_MODEL_LEN) -> Path:
    """A model directory with a byte-level BPE tokenizer (rare characters split into
    several byte tokens), a chat template, and config.json; no weights."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos_id)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": {"content": EOS}, "chat_template": CHAT_TEMPLATE,
    }))
    (path / "config.json").write_text(json.dumps({
        "max_position_embeddings": max_model_len, "eos_token_id": tok.token_to_id(EOS),
    }))
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> TextModel:
    return TextModel.load(make_model_dir(tmp_path_factory.mktemp("model")))


def test_load_reads_limits_and_eos(text):
    assert text.max_model_len == MAX_MODEL_LEN
    assert text.eos_token_ids == (text.tokenizer.token_to_id(EOS),)
    assert text.vocab_size == text.tokenizer.hf.get_vocab_size(with_added_tokens=True)


def test_encode_adds_bos_only_when_asked(text):
    bos = text.tokenizer.token_to_id(BOS)
    with_bos = text.encode("hello world")
    assert with_bos[0] == bos
    assert text.encode("hello world", add_special_tokens=False) == with_bos[1:]


def test_chat_template_renders_roles_and_generation_prompt(text):
    prompt = text.apply_chat_template([
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
    ])
    assert prompt == "<s>[system]: be brief\n[user]: hi\n[assistant]: "


def test_missing_chat_template_is_a_clear_error(tmp_path):
    root = make_model_dir(tmp_path)
    config = json.loads((root / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    text = TextModel.load(root)
    assert not text.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        text.apply_chat_template([{"role": "user", "content": "x"}])


def test_generation_config_eos_list_is_merged(tmp_path):
    root = make_model_dir(tmp_path)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    text = TextModel.load(root)
    assert text.eos_token_ids[:2] == (7, 1)
    assert text.tokenizer.token_to_id(EOS) in text.eos_token_ids


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextModel.load(tmp_path)
    root = make_model_dir(tmp_path / "m")
    (root / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TextModel.load(root)


@pytest.mark.parametrize("sample", ["hello 世界 🚀 fox", "é à ü — naïve café", "emoji 🎉🎉 end"])
def test_detokenizer_streams_multibyte_utf8_token_by_token(text, sample):
    ids = text.encode(sample, add_special_tokens=False)
    assert len(ids) > len(sample.split())  # some characters span several tokens
    detok = text.detokenizer(text.encode("the", add_special_tokens=True))
    pieces = [detok.step([token_id]) for token_id in ids]
    assert "".join(pieces) == sample
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a token ending inside a character yields nothing yet


def test_detokenizer_in_uneven_batches_matches_one_by_one(text):
    sample = "the quick 🚀 brown fox, 世界!"
    ids = text.encode(sample, add_special_tokens=False)
    detok = text.detokenizer([])
    out, i = [], 0
    for size in (3, 1, 5, 2, 100):
        out.append(detok.step(ids[i : i + size]))
        i += size
    assert "".join(out) == sample


def test_detokenizer_skips_special_tokens(text):
    eos = text.tokenizer.token_to_id(EOS)
    detok = text.detokenizer([])
    ids = text.encode("hello", add_special_tokens=False)
    assert detok.step(ids) + detok.step([eos]) == "hello"


def cut_mid_character(text: TextModel, sample: str) -> list[int]:
    """Ids of `sample` cut after a token that ends partway through a UTF-8 character."""
    ids = text.encode(sample, add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if text.tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, "the sample has no multi-token character"
    return ids[: cuts[-1]]


@pytest.mark.parametrize("sizes", [(1,), (2,), (3, 1), (100,)])
def test_flush_renders_a_last_token_that_ends_mid_character(text, sizes):
    ids = cut_mid_character(text, "the fox 世界 🚀")
    whole = text.tokenizer.decode(ids)
    assert whole.endswith("\ufffd")
    detok = text.detokenizer(text.encode("the", add_special_tokens=True))
    pieces, i, k = [], 0, 0
    while i < len(ids):
        size = sizes[k % len(sizes)]
        pieces.append(detok.step(ids[i : i + size]))
        i, k = i + size, k + 1
    assert not "".join(pieces).endswith("\ufffd")  # held back: it might still complete
    pieces.append(detok.flush())
    assert "".join(pieces) == whole
    assert detok.flush() == ""


def test_flush_is_empty_when_the_text_is_complete(text):
    detok = text.detokenizer([])
    ids = text.encode("hello 世界", add_special_tokens=False)
    assert detok.step(ids) == "hello 世界" and detok.flush() == ""


def test_encoding_follows_the_tokenizer_configs_bos_flags(tmp_path):
    """add_bos_token / add_eos_token in tokenizer_config.json (Llama 2, Mistral): the ids
    are added by hand, whatever tokenizer.json's post-processor does; a rendered chat
    template, encoded without special tokens, gets none."""
    root = make_model_dir(tmp_path)
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps(
        {**config, "add_bos_token": False, "add_eos_token": True}))
    text = TextModel.load(root)
    plain = text.encode("hello", add_special_tokens=False)
    assert plain and plain[0] != text.tokenizer.token_to_id(BOS)
    assert text.encode("hello") == [*plain, text.tokenizer.token_to_id(EOS)]


# ---- the characters-per-token bound -------------------------------------------------------


def test_max_prompt_chars_is_the_context_times_the_longest_token(text):
    vocab = text.tokenizer.hf.get_vocab(with_added_tokens=True)
    longest = max(len(token) for token in vocab)
    assert text.max_chars_per_token == longest
    assert text.max_prompt_chars == MAX_MODEL_LEN * longest


def test_max_composed_chars_matches_unicodedata():
    import unicodedata

    assert text_module.MAX_COMPOSED_CHARS == max(
        len(unicodedata.normalize("NFD", chr(c))) for c in range(0x110000))


BPE = {"type": "BPE", "unk_token": None, "fuse_unk": False, "byte_fallback": False}
SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}


@pytest.mark.parametrize(("spec", "bound"), [
    ({"model": BPE}, 5),
    ({"model": BPE, "pre_tokenizer": {"type": "ByteLevel"}}, 5),
    ({"model": BPE, "normalizer": {"type": "NFC"}}, 20),
    ({"model": BPE, "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, SPACE]}}, 5),
    ({"model": BPE, "normalizer": {"type": "Replace", "pattern": {"String": "abc"},
                                   "content": "x"}}, 15),
    ({"model": BPE, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "behavior": "Isolated"}, {"type": "ByteLevel"}]}}, 5),
    ({"model": {**BPE, "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True}}, 5),
    ({"model": {**BPE, "unk_token": "<unk>"}}, 5),  # one unknown character, one token
    # Unbounded: text is dropped or fused somewhere.
    ({"model": {**BPE, "unk_token": "<unk>", "fuse_unk": True}}, None),
    ({"model": {"type": "Unigram", "unk_id": 0}}, None),
    ({"model": {"type": "WordPiece"}}, None),
    ({"model": BPE, "pre_tokenizer": {"type": "Whitespace"}}, None),
    ({"model": BPE, "pre_tokenizer": {"type": "Split", "behavior": "Removed"}}, None),
    ({"model": BPE, "normalizer": {"type": "Sequence", "normalizers": [
        SPACE, {"type": "Strip"}]}}, None),
    ({"model": BPE, "normalizer": {"type": "Replace", "pattern": {"Regex": " +"},
                                   "content": " "}}, None),
    ({"model": BPE, "normalizer": {"type": "Precompiled"}}, None),
    ({"model": BPE, "added_tokens": [{"content": "<m>", "lstrip": True, "rstrip": False}]}, None),
    ({"model": BPE, "truncation": {"max_length": 8}}, None),
])
def test_max_chars_per_token_follows_the_pipeline(spec, bound):
    assert text_module.max_chars_per_token(spec, ["a", "hello", "xy"]) == bound


def _nfc_metaspace_tokenizer(path: Path) -> Path:
    """NFC normalizer + Metaspace + byte-fallback BPE (Llama 2 / Qwen2 shapes combined)."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", *(f"<0x{b:02X}>" for b in range(256))],
        limit_alphabet=60)
    tok.train_from_iterator(CORPUS * 4 + ["e\u0301 \u1100\u1161\u11a8 " * 20], trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    return path


ADVERSARIAL = [
    " " * 5000, "#" * 5000, "\n" * 3000, "hello world " * 400,
    "e\u0301" * 2000, "\u1100\u1161\u11a8" * 1500, "\u03b1\u0313\u0300\u0345" * 1000,
    "🚀" * 1000, "the quick brown fox " * 300, "<s></s>" * 500,
]


@pytest.mark.parametrize("which", ["byte_level", "nfc_metaspace"])
def test_no_text_packs_more_characters_into_a_token_than_the_bound(tmp_path, which):
    root = (make_model_dir(tmp_path) if which == "byte_level"
            else _nfc_metaspace_tokenizer(tmp_path / "m"))
    text = TextModel.load(root)
    assert text.max_chars_per_token is not None
    for sample in ADVERSARIAL:
        num_tokens = len(text.encode(sample, add_special_tokens=False))
        assert len(sample) <= num_tokens * text.max_chars_per_token, sample[:20]
