"""common/text.py's Tokenizer and its incremental Detokenizer, on the byte-level BPE
make_model writes and on a Llama 2 style (SentencePiece-like, byte-fallback) tokenizer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, trainers

from ferry.common import text as text_module
from ferry.common.text import REPLACEMENT_CHAR, Tokenizer
from ferry.services.worker.model.make_model import write_tokenizer

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "héllo wörld, ça va? naïve façade",
    "你好，世界！こんにちは 안녕하세요",
    "emoji 🚀🔥 and flags 🇫🇷 and combining e\u0301",
    "  leading spaces and trailing  ",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 👋"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Sum 2+2?"},
]


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    write_tokenizer(out, vocab_size=4200, model_max_length=4096)
    return out


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """Llama 2's tokenizer.json shape: "▁" for spaces, characters outside the small
    alphabet fall back to <0xXX> byte tokens, the decoder strips one leading space."""
    out = tmp_path_factory.mktemp("spm")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    alphabet = list("abcdefghijklmnopqrstuvwxyz▁,.()+-:<\n")
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),  # nothing else: other characters use byte fallback
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "special": True},
                "eos_token": "</s>",
                "add_bos_token": True,
                "add_eos_token": False,
                "chat_template": [
                    {
                        "name": "default",
                        "template": "{% for m in messages %}[{{ m.role }}]"
                        "{{ m.content }}{% endfor %}{{ eos_token }}",
                    },
                ],
            }
        )
    )
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(byte_level_dir, sentencepiece_dir, text):
    for model_dir in (byte_level_dir, sentencepiece_dir):
        tok = Tokenizer(model_dir)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens(byte_level_dir, sentencepiece_dir):
    tok = Tokenizer(byte_level_dir)
    assert tok.vocab_size == 4200
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0
    assert tok.decode([4199]) == "<|reserved_special_token_103|>"  # padded ids decode
    assert (
        tok.decode([0, *tok.encode("hi", add_special_tokens=False)], skip_special_tokens=True)
        == "hi"
    )
    spm = Tokenizer(sentencepiece_dir)
    assert spm.encode("hello")[0] == spm.bos_token_id == 1
    assert spm.eos_token_id == 2


def test_byte_fallback_is_used(sentencepiece_dir):
    tok = Tokenizer(sentencepiece_dir)
    ids = tok.encode("你", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert REPLACEMENT_CHAR in pieces  # each <0xXX> alone is half a character
    assert tok.decode(ids) == "你"


def test_matches_transformers(byte_level_dir):
    """Our wrapper and transformers agree on ids and on the rendered chat template."""
    script = f"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(byte_level_dir)!r})
texts, messages = json.load(sys.stdin)
print(json.dumps([[tok(t).input_ids for t in texts],
                  tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                  tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([TEXTS, MESSAGES]),
        capture_output=True,
        text=True,
        check=True,
    )
    ids, with_prompt, without_prompt = json.loads(out.stdout)
    tok = Tokenizer(byte_level_dir)
    assert ids == [tok.encode(t) for t in TEXTS]
    assert tok.apply_chat_template(MESSAGES) == with_prompt
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == without_prompt


def test_chat_template(byte_level_dir, sentencepiece_dir):
    rendered = Tokenizer(byte_level_dir).apply_chat_template(MESSAGES[1:2])
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi 👋<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    spm = Tokenizer(sentencepiece_dir)  # template given as a named list
    assert spm.apply_chat_template(MESSAGES[:2]) == "[system]You are terse.[user]Hi 👋</s>"


def test_chat_template_file_and_raise_exception(tmp_path, byte_level_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((byte_level_dir / name).read_text())
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{{ messages | tojson }}"
    )
    tok = Tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '[{"role": "user", "content": "é"}]'
    )
    with pytest.raises(Exception, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, *, prompt_ids=(),
            skip_special_tokens=False) -> list[str]:
    """Feed ids in random-sized groups; the deltas, flush last."""
    detok = tok.detokenizer(prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.step(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece"])
def test_incremental_text_never_holds_half_characters(which, byte_level_dir, sentencepiece_dir):
    tok = Tokenizer(byte_level_dir if which == "byte_level" else sentencepiece_dir)
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, ids, rng)
        assert "".join(deltas) == tok.decode(ids)
        assert not any(REPLACEMENT_CHAR in d for d in deltas)
        # one token at a time too
        detok = tok.detokenizer(skip_special_tokens=False)
        one_by_one = [detok.step([i]) for i in ids] + [detok.flush()]
        assert "".join(one_by_one) == tok.decode(ids)
        assert not any(REPLACEMENT_CHAR in d for d in one_by_one)


def _random_ids(tok: Tokenizer, rng: random.Random, *, valid_utf8: bool) -> list[int]:
    """Up to 30 ids, about half of them pieces of multi-byte characters. valid_utf8:
    whole characters only (byte tokens come in complete runs), else any ids."""
    pieces = [tok.encode(c, add_special_tokens=False) for c in "你好世界çaö🚀é "]
    byte_tokens = {tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}  # spm byte fallback
    ids: list[int] = []
    for _ in range(rng.randint(1, 30)):
        if rng.random() < 0.5:
            piece = rng.choice(pieces)
            ids.extend(piece if valid_utf8 else piece[: rng.randint(1, len(piece))])
        else:
            token = rng.randrange(tok.vocab_size)
            if not valid_utf8 or (
                token not in byte_tokens and REPLACEMENT_CHAR not in tok.decode([token])
            ):
                ids.append(token)
    return ids


def test_incremental_equals_full_decode_on_random_streams(byte_level_dir):
    """Byte-level BPE, random ids (invalid UTF-8 included): deltas + flush == the full
    decode, with a prompt as left context or without, skipping special tokens or not."""
    tok = Tokenizer(byte_level_dir)
    rng = random.Random(1)
    for trial in range(300):
        ids = _random_ids(tok, rng, valid_utf8=False)
        prompt = tok.encode(rng.choice(TEXTS)) if trial % 2 else []
        skip = trial % 3 == 0
        deltas = _stream(tok, ids, rng, prompt_ids=prompt, skip_special_tokens=skip)
        expected = tok.decode(prompt + ids, skip_special_tokens=skip)
        assert tok.decode(prompt, skip_special_tokens=skip) + "".join(deltas) == expected


def test_incremental_equals_full_decode_byte_fallback(sentencepiece_dir):
    """Byte-fallback decoding of an invalid byte run is not local (every byte of the
    run becomes U+FFFD, even a valid prefix), so here the streams are valid UTF-8 in
    random tokens, cut anywhere, and deltas + flush == the full decode."""
    tok = Tokenizer(sentencepiece_dir)
    rng = random.Random(2)
    for trial in range(300):
        ids = _random_ids(tok, rng, valid_utf8=True)
        prompt = tok.encode(rng.choice(TEXTS)) if trial % 2 else []
        deltas = _stream(tok, ids, rng, prompt_ids=prompt)
        assert tok.decode(prompt) + "".join(deltas) == tok.decode(prompt + ids)
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.parametrize("special", [True, False])
def test_long_text_encodes_as_short_text_does(byte_level_dir, sentencepiece_dir, special):
    """Text past GIL_FREE_ENCODE_CHARS goes through encode_batch (which releases the GIL):
    the same ids as the tokenizer's plain encode."""
    text = "".join(TEXTS) * 200
    assert len(text) > text_module.GIL_FREE_ENCODE_CHARS
    for model_dir in (byte_level_dir, sentencepiece_dir):
        tok = Tokenizer(model_dir)
        hf = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        plain = hf.encode(text, add_special_tokens=False).ids
        ids = tok.encode(text, add_special_tokens=special)
        assert ids[len(ids) - len(plain):] == plain
        assert ids == tok.encode(text[:100] + text[100:], add_special_tokens=special)


def test_long_text_is_encoded_without_holding_the_gil(byte_level_dir):
    """Another thread keeps running while a long text is encoded (the gateway's event loop
    while its pool tokenizes); plain `encode` would stop it for the whole call."""
    tok = Tokenizer(byte_level_dir)
    text = TEXTS[0] * 4000  # ~260k characters
    ticks, done = [0], threading.Event()

    def ticker():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        before = ticks[0]
        tok.encode(text)
        during = ticks[0] - before
    finally:
        done.set()
        thread.join()
    assert during >= 5, during
