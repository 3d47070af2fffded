"""Text <-> token ids for a Hugging Face model directory; torch-free. The one text module:
the gateway tokenizes, renders chat templates and detokenizes with it, `ferry generate`
and the tests encode and decode with it. (The worker needs no text: structured output
hands tokenizer.json to llguidance, services/worker/grammar.py.)

Files read:

    tokenizer.json          the fast tokenizer (`tokenizers`)
    tokenizer_config.json   bos_token, eos_token, add_bos_token, add_eos_token, chat_template
    chat_template.jinja     chat template (newer layout; wins over tokenizer_config)
    config.json             max_position_embeddings, eos_token_id (TextModel)
    generation_config.json  eos_token_id (int or list); sampling defaults (temperature,
                            top_p, top_k, min_p, repetition_penalty); optional (TextModel)

- `Tokenizer`: encode, decode, special tokens, chat template (rendered with jinja2 the way
  transformers renders it).
- `Detokenizer`: one request's token stream in, text deltas out (the `tokenizers`
  DecodeStream, Rust, one call per delta); never half a character until the end.
- `TextModel`: what the gateway needs of a model's text side: a Tokenizer, EOS ids,
  context length, sampling defaults, and the characters-per-token bound below.

`max_prompt_chars` bounds a prompt's length in characters without tokenizing it: a token
covers at most `max_chars_per_token` characters of the text (its vocabulary string's
length, times what the normalizer may merge), so more than max_model_len times that many
characters can never fit the context. None where the tokenizer can make one token of
unboundedly many characters (it drops or fuses text: whitespace pre-tokenizers, strip
normalizers, fused unknowns, added tokens that eat spaces).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers.decoders import DecodeStream

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template alone
REPLACEMENT_CHAR = "\ufffd"
# Longer text is encoded with encode_batch, which releases the GIL (encode holds it: a
# 1 MB prompt stopped every other thread of the process for a second).
GIL_FREE_ENCODE_CHARS = 4096
# Prompt tokens the detokenizer starts from, so the first output token's text is rendered
# in context (a leading space of a SentencePiece "▁word" token survives).
DETOKENIZE_CONTEXT_TOKENS = 6

# NFC / NFKC compose at most this many characters into one (the longest canonical
# decomposition, e.g. U+1F82 -> 4 code points; tests check it against unicodedata).
MAX_COMPOSED_CHARS = 4
# Normalizers that never shrink text (NFD/NFKD only decompose; no lowercase mapping is
# shorter than its character); the value is how many input characters one output
# character may stand for.
_NORMALIZER_FACTORS = {
    "NFD": 1, "NFKD": 1, "Lowercase": 1, "Prepend": 1, "ByteLevel": 1,
    "NFC": MAX_COMPOSED_CHARS, "NFKC": MAX_COMPOSED_CHARS,
}
# Pre-tokenizers that keep every character (Split and Punctuation unless "Removed").
_KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation", "FixedLength"}
)


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir}: no {TOKENIZER_FILE} (a Hugging Face model directory?)")
        self.hf = tokenizers.Tokenizer.from_file(str(path))  # the Rust tokenizer itself
        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        # Explicit flags (Llama/Mistral tokenizer configs) mean: add by hand. Without
        # them, tokenizer.json's own post-processor decides (Llama 3, Qwen2).
        add_bos = config.get("add_bos_token")
        self._add_bos: bool | None = None if add_bos is None else bool(add_bos)
        self._add_eos = bool(config.get("add_eos_token", False))
        template_file = model_dir / CHAT_TEMPLATE_FILE
        self.chat_template = (template_file.read_text() if template_file.is_file()
                              else _pick_template(config.get("chat_template")))
        self._template = None if self.chat_template is None else _compile(self.chat_template)

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer knows, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds BOS (and EOS) as the model expects.
        Encode a rendered chat template with add_special_tokens=False: it has its BOS."""
        if self._add_bos is None:
            return self._encode(text, add_special_tokens)
        ids = self._encode(text, False)
        if add_special_tokens:
            if self._add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self._add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > GIL_FREE_ENCODE_CHARS:
            return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation ([{"role": ..., "content": ...}, ...]);
        `tools` as transformers passes them (OpenAI's {"type": "function", "function":
        {...}} entries; None: no tools). Raises jinja2.TemplateError where the template
        refuses the messages."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._template.render(
            messages=[dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def detokenizer(self, context_token_ids: Sequence[int] = (), *,
                    skip_special_tokens: bool = True) -> Detokenizer:
        """An incremental detokenizer whose text continues that of context_token_ids (a
        prompt: its last DETOKENIZE_CONTEXT_TOKENS render the first delta in context)."""
        return Detokenizer(self.hf, context_token_ids[-DETOKENIZE_CONTEXT_TOKENS:],
                           skip_special_tokens=skip_special_tokens)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)


class Detokenizer:
    """Incremental detokenizer for one request: token ids in, text deltas out. A token that
    ends inside a multi-byte UTF-8 character yields "" until the character completes;
    `flush` renders whatever is still incomplete at the end, with U+FFFD for the bytes of a
    character that never completed (as vLLM does), so the deltas joined are the whole text
    however the ids were split into steps:

        decode(context + ids) == decode(context) + "".join(steps) + flush()
    """

    __slots__ = ("_tokenizer", "_stream", "_skip_special_tokens", "_context", "_pending")

    def __init__(self, tokenizer: tokenizers.Tokenizer, context_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=list(context_token_ids),
                                    skip_special_tokens=skip_special_tokens)
        # Ids before the pending ones (rendering context), and ids fed since the last text.
        self._context: list[int] = list(context_token_ids)[-DETOKENIZE_CONTEXT_TOKENS:]
        self._pending: list[int] = []

    def step(self, token_ids: Sequence[int]) -> str:
        """Feed the next ids; the text they complete (maybe "")."""
        if not token_ids:
            return ""
        text = self._stream.step(self._tokenizer, list(token_ids))
        if text is None:  # incomplete (or nothing visible yet): held by the stream
            self._pending.extend(token_ids)
            return ""
        self._context = (self._context + self._pending + list(token_ids))[
            -DETOKENIZE_CONTEXT_TOKENS:]
        self._pending = []
        return text

    def flush(self) -> str:
        """The text of the ids the stream still holds back, decoded lossily (the end of
        the output: nothing will complete them)."""
        if not self._pending:
            return ""
        decode = functools.partial(self._tokenizer.decode,
                                   skip_special_tokens=self._skip_special_tokens)
        before = decode(self._context)
        whole = decode(self._context + self._pending)
        text = whole[len(before):] if whole.startswith(before) else decode(self._pending)
        self._context = (self._context + self._pending)[-DETOKENIZE_CONTEXT_TOKENS:]
        self._pending = []
        return text


class TextModel:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        max_chars_per_token: int | None = None,
        sampling_defaults: dict[str, float | int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.vocab_size
        self.max_chars_per_token = max_chars_per_token  # None: no bound (see module doc)
        # Longer prompt text can never fit the context; None: no bound.
        self.max_prompt_chars = (
            None if max_chars_per_token is None else max_model_len * max_chars_per_token
        )
        # The model's sampling defaults (generation_config.json), for requests that give none
        self.sampling_defaults = dict(sampling_defaults or {})

    @classmethod
    def load(cls, model_dir: str | Path) -> TextModel:
        root = Path(model_dir)
        tokenizer = Tokenizer(root)
        model_config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")

        eos_ids: list[int] = []
        for source in (gen_config.get("eos_token_id"), model_config.get("eos_token_id")):
            for token_id in source if isinstance(source, list) else [source]:
                if isinstance(token_id, int) and token_id not in eos_ids:
                    eos_ids.append(token_id)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(tokenizer.eos_token_id)

        max_model_len = model_config.get("max_position_embeddings")
        if not isinstance(max_model_len, int) or not 0 < max_model_len < 10**8:
            raise ValueError(f"{root}: config.json has no max_position_embeddings")
        spec = json.loads((root / TOKENIZER_FILE).read_text())
        return cls(
            tokenizer, eos_token_ids=tuple(eos_ids), max_model_len=max_model_len,
            max_chars_per_token=max_chars_per_token(
                spec, tokenizer.hf.get_vocab(with_added_tokens=True)),
            sampling_defaults=sampling_defaults(gen_config),
        )

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    @property
    def renders_tools(self) -> bool:
        """The chat template reads `tools` (transformers' convention), so a model sees the
        functions it may call."""
        template = self.tokenizer.chat_template
        return template is not None and "tools" in template

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for a chat, ending where the assistant's answer begins; `tools`
        (OpenAI's shape) go to the template as transformers passes them. Raises ValueError
        when the model has no template or the template rejects the messages."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    def detokenizer(self, prompt_token_ids: Sequence[int], *,
                    skip_special_tokens: bool = True) -> Detokenizer:
        return self.tokenizer.detokenizer(prompt_token_ids,
                                          skip_special_tokens=skip_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own, special tokens included (logprobs show these; a
        token that is part of a character reads U+FFFD, as in vLLM)."""
        return self.tokenizer.hf.decode_batch([[t] for t in token_ids],
                                              skip_special_tokens=False)


def max_chars_per_token(spec: dict[str, Any], vocab: Iterable[str]) -> int | None:
    """Most characters of input text one token can stand for, from tokenizer.json (`spec`)
    and the vocabulary's token strings (added tokens included); None when unbounded.

    A token's string is at least as long as the text it covers: byte-level tokens spell
    one character per byte, SentencePiece ones one per character ("▁" for a space),
    byte-fallback and continuation tokens ("<0x41>", "##s") more. So the bound is the
    longest string, times what the normalizer may compose into one character, provided
    no stage drops or fuses text."""
    if spec.get("truncation"):
        return None  # any text encodes to at most max_length tokens
    for added in spec.get("added_tokens") or ():
        if added.get("lstrip") or added.get("rstrip"):
            return None  # the token swallows any run of spaces beside it
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind not in ("BPE", "Unigram"):
        return None  # WordPiece / WordLevel: a whole unknown word becomes one [UNK]
    fuses_unknowns = model.get("fuse_unk", kind == "Unigram")
    unknown = model.get("unk_token") is not None or model.get("unk_id") is not None
    if unknown and fuses_unknowns and not model.get("byte_fallback"):
        return None  # a run of unknown characters becomes one token
    factor = _normalizer_factor(spec.get("normalizer"))
    if factor is None or not _keeps_characters(spec.get("pre_tokenizer")):
        return None
    longest = max((len(token) for token in vocab), default=0)
    return longest * factor if longest else None


def _normalizer_factor(normalizer: dict[str, Any] | None) -> int | None:
    """How many input characters one normalized character may stand for; None when the
    normalizer can drop characters (Strip, StripAccents, Bert, Precompiled, unknown)."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers") or ():
            part_factor = _normalizer_factor(part)
            if part_factor is None:
                return None
            factor *= part_factor
        return factor
    if kind == "Replace":
        pattern, content = normalizer.get("pattern") or {}, normalizer.get("content")
        if "String" not in pattern or not isinstance(content, str) or not content:
            return None  # a regex can match any length; an empty content deletes
        return max(1, -(-len(pattern["String"]) // len(content)))
    return _NORMALIZER_FACTORS.get(kind)


def _keeps_characters(pre_tokenizer: dict[str, Any] | None) -> bool:
    """False when the pre-tokenizer can drop characters (Whitespace, Bert, a "Removed"
    split, unknown kinds)."""
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(p) for p in pre_tokenizer.get("pretokenizers") or ())
    return kind in _KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def sampling_defaults(gen_config: dict[str, Any]) -> dict[str, float | int]:
    """The sampling defaults a generation_config.json sets (those vLLM reads), checked."""
    out: dict[str, float | int] = {}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = gen_config.get(name)
        if type(value) in (int, float):
            out[name] = float(value)
    if type(gen_config.get("top_k")) is int:
        out["top_k"] = gen_config["top_k"]
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open() as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} with a "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(template: str) -> jinja2.Template:
    """A template in the sandboxed environment transformers uses for chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
