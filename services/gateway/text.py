"""What the gateway needs of a model's text side: encode, chat template, incremental
detokenization, EOS ids, context length. Torch-free.

Loaded from a Hugging Face model directory:

    tokenizer.json          the fast tokenizer (`tokenizers`)
    tokenizer_config.json   chat_template, eos_token, bos_token, add_bos_token
    chat_template.jinja     chat template (newer layout; wins over tokenizer_config)
    config.json             max_position_embeddings, eos_token_id
    generation_config.json  eos_token_id (int or list); sampling defaults (temperature,
                            top_p, top_k, min_p, repetition_penalty); optional

Encoding and chat templates come from the worker's tokenizer module
(services/worker/model/tokenizer.py) so that gateway and engine agree on every id; where
that module is absent, `_TokenizersOnly` does the same job with `tokenizers` alone.
Detokenization uses the `tokenizers` DecodeStream (Rust; one call per delta).

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2.sandbox
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

try:
    from ferry.services.worker.model import tokenizer as worker_tokenizer
except ImportError:  # a checkout without the worker's model package
    worker_tokenizer = None

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

# Prompt tokens the detokenizer starts from, so the first output token's text is rendered
# in context (a leading space of a SentencePiece "▁word" token survives).
DETOKENIZE_CONTEXT_TOKENS = 6


class BaseTokenizer(Protocol):
    """What TextModel uses of a tokenizer (the worker's Tokenizer, or _TokenizersOnly)."""

    eos_token: str | None
    chat_template: str | None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            tools: Sequence[dict[str, Any]] | None = None) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class Detokenizer:
    """Incremental detokenizer for one request: token ids in, text deltas out. A token that
    ends inside a multi-byte UTF-8 character yields "" until the character completes;
    `flush` renders whatever is still incomplete at the end, with U+FFFD for the bytes of a
    character that never completed (as vLLM does), so the deltas joined are the whole text
    however the ids were split into steps."""

    __slots__ = ("_tokenizer", "_stream", "_skip_special_tokens", "_context", "_pending")

    def __init__(self, tokenizer: Tokenizer, context_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=list(context_token_ids),
                                    skip_special_tokens=skip_special_tokens)
        # Ids before the pending ones (rendering context), and ids fed since the last text.
        self._context: list[int] = list(context_token_ids)[-DETOKENIZE_CONTEXT_TOKENS:]
        self._pending: list[int] = []

    def step(self, token_ids: Sequence[int]) -> str:
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
        base: BaseTokenizer,
        fast: Tokenizer,
        *,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        max_chars_per_token: int | None = None,
        sampling_defaults: dict[str, float | int] | None = None,
    ) -> None:
        self.base = base  # encode, chat template
        self.tokenizer = fast  # the `tokenizers` object behind detokenization
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = fast.get_vocab_size(with_added_tokens=True)
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
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json (a Hugging Face model directory?)")
        fast = Tokenizer.from_file(str(root / "tokenizer.json"))
        base = worker_tokenizer.Tokenizer(root) if worker_tokenizer else _TokenizersOnly(root)
        model_config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")

        eos_ids: list[int] = []
        for source in (gen_config.get("eos_token_id"), model_config.get("eos_token_id")):
            for token_id in source if isinstance(source, list) else [source]:
                if isinstance(token_id, int) and token_id not in eos_ids:
                    eos_ids.append(token_id)
        if base.eos_token is not None:
            token_id = base.token_to_id(base.eos_token)
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)

        max_model_len = model_config.get("max_position_embeddings")
        if not isinstance(max_model_len, int) or not 0 < max_model_len < 10**8:
            raise ValueError(f"{root}: config.json has no max_position_embeddings")
        spec = json.loads((root / "tokenizer.json").read_text())
        return cls(
            base, fast, eos_token_ids=tuple(eos_ids), max_model_len=max_model_len,
            max_chars_per_token=max_chars_per_token(spec, fast.get_vocab(with_added_tokens=True)),
            sampling_defaults=sampling_defaults(gen_config),
        )

    @property
    def has_chat_template(self) -> bool:
        return self.base.chat_template is not None

    @property
    def renders_tools(self) -> bool:
        """The chat template reads `tools` (transformers' convention), so a model sees the
        functions it may call."""
        template = self.base.chat_template
        return template is not None and "tools" in template

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.base.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for a chat, ending where the assistant's answer begins; `tools`
        (OpenAI's shape) go to the template as transformers passes them. Raises ValueError
        when the model has no template or the template rejects the messages."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            if tools is None:  # (a tokenizer that knows no tools is asked as before)
                return self.base.apply_chat_template(messages)
            return self.base.apply_chat_template(messages, tools=tools)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    def detokenizer(self, prompt_token_ids: Sequence[int], *,
                    skip_special_tokens: bool = True) -> Detokenizer:
        return Detokenizer(self.tokenizer, prompt_token_ids[-DETOKENIZE_CONTEXT_TOKENS:],
                           skip_special_tokens=skip_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own, special tokens included (logprobs show these; a
        token that is part of a character reads U+FFFD, as in vLLM)."""
        return self.tokenizer.decode_batch([[t] for t in token_ids], skip_special_tokens=False)


class _TokenizersOnly:
    """Encode and chat template from tokenizer.json + tokenizer_config.json alone, for
    checkouts without services/worker/model/tokenizer.py (same files, same rules)."""

    def __init__(self, root: Path) -> None:
        config = _read_json(root / "tokenizer_config.json")
        self._tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            self.chat_template = template_file.read_text()
        else:
            self.chat_template = _pick_template(config.get("chat_template"))
        self._template = None
        if self.chat_template is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = lambda value, indent=None: json.dumps(
                value, ensure_ascii=False, indent=indent
            )
            self._template = env.from_string(self.chat_template)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 4096:  # encode_batch drops the GIL: a caller's thread runs freely
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            tools: Sequence[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._template.render(
            messages=list(messages), add_generation_prompt=True, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


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


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open() as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
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
