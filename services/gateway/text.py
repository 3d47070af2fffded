"""What the gateway needs of a model's text side: encode, chat template, incremental
detokenization, EOS ids, context length. Torch-free.

Loaded from a Hugging Face model directory:

    tokenizer.json          the fast tokenizer (`tokenizers`)
    tokenizer_config.json   chat_template, eos_token, bos_token, add_bos_token
    chat_template.jinja     chat template (newer layout; wins over tokenizer_config)
    config.json             max_position_embeddings, eos_token_id
    generation_config.json  eos_token_id (int or list), optional

Encoding and chat templates come from the worker's tokenizer module
(services/worker/model/tokenizer.py) so that gateway and engine agree on every id; where
that module is absent, `_TokenizersOnly` does the same job with `tokenizers` alone.
Detokenization uses the `tokenizers` DecodeStream (Rust; one call per delta).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2.sandbox
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

try:
    from ferry.services.worker.model import tokenizer as worker_tokenizer
except ImportError:  # a checkout without the worker's model package
    worker_tokenizer = None

# Prompt tokens the detokenizer starts from, so the first output token's text is rendered
# in context (a leading space of a SentencePiece "▁word" token survives).
DETOKENIZE_CONTEXT_TOKENS = 6


class BaseTokenizer(Protocol):
    """What TextModel uses of a tokenizer (the worker's Tokenizer, or _TokenizersOnly)."""

    eos_token: str | None
    chat_template: str | None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class Detokenizer:
    """Incremental detokenizer for one request: token ids in, text deltas out. A token that
    ends inside a multi-byte UTF-8 character yields "" until the character completes."""

    __slots__ = ("_tokenizer", "_stream")

    def __init__(self, tokenizer: Tokenizer, context_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=list(context_token_ids), skip_special_tokens=True)

    def step(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        return self._stream.step(self._tokenizer, list(token_ids)) or ""


class TextModel:
    def __init__(
        self,
        base: BaseTokenizer,
        fast: Tokenizer,
        *,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
    ) -> None:
        self.base = base  # encode, chat template
        self.tokenizer = fast  # the `tokenizers` object behind detokenization
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = fast.get_vocab_size(with_added_tokens=True)

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
        return cls(base, fast, eos_token_ids=tuple(eos_ids), max_model_len=max_model_len)

    @property
    def has_chat_template(self) -> bool:
        return self.base.chat_template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.base.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for a chat, ending where the assistant's answer begins. Raises
        ValueError when the model has no template or the template rejects the messages."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            return self.base.apply_chat_template(messages)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> Detokenizer:
        return Detokenizer(self.tokenizer, prompt_token_ids[-DETOKENIZE_CONTEXT_TOKENS:])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


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

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._template.render(
            messages=list(messages), add_generation_prompt=True,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


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
