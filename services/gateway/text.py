"""What the gateway needs of a model's text side: encode, chat template, incremental
detokenization, EOS ids, context length. Torch-free.

Loaded from a Hugging Face model directory:

    tokenizer.json          the fast tokenizer (`tokenizers`)
    tokenizer_config.json   chat_template, eos_token, bos_token, model_max_length
    chat_template.jinja     chat template (newer layout; wins over tokenizer_config)
    config.json             max_position_embeddings, eos_token_id
    generation_config.json  eos_token_id (int or list), optional

The worker's tokenizer module (services/worker/model/tokenizer.py) reads the same files;
this class stays the gateway's one seam to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2.sandbox
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens the detokenizer starts from, so the first output token's text is rendered
# in context (a leading space of a SentencePiece "▁word" token survives).
DETOKENIZE_CONTEXT_TOKENS = 6


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
        tokenizer: Tokenizer,
        *,
        chat_template: str | None,
        special_tokens: dict[str, str],
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special_tokens = special_tokens  # bos_token / eos_token for the template
        self._chat_template = None
        if chat_template is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = lambda value, indent=None: json.dumps(
                value, ensure_ascii=False, indent=indent
            )
            self._chat_template = env.from_string(chat_template)

    @classmethod
    def load(cls, model_dir: str | Path) -> TextModel:
        root = Path(model_dir)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json (a Hugging Face model directory?)")
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        tok_config = _read_json(root / "tokenizer_config.json")
        model_config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")

        special_tokens = {
            name: text
            for name in ("bos_token", "eos_token")
            if (text := _token_text(tok_config.get(name))) is not None
        }
        eos_ids: list[int] = []
        for source in (gen_config.get("eos_token_id"), model_config.get("eos_token_id")):
            for token_id in source if isinstance(source, list) else [source]:
                if isinstance(token_id, int) and token_id not in eos_ids:
                    eos_ids.append(token_id)
        if "eos_token" in special_tokens:
            token_id = tokenizer.token_to_id(special_tokens["eos_token"])
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)

        max_model_len = model_config.get("max_position_embeddings")
        if not isinstance(max_model_len, int):
            max_model_len = tok_config.get("model_max_length")
        if not isinstance(max_model_len, int) or not 0 < max_model_len < 10**8:
            raise ValueError(f"{root}: config.json has no max_position_embeddings")

        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text()
        else:
            chat_template = _pick_template(tok_config.get("chat_template"))
        return cls(
            tokenizer,
            chat_template=chat_template,
            special_tokens=special_tokens,
            eos_token_ids=tuple(eos_ids),
            max_model_len=max_model_len,
        )

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for a chat, ending where the assistant's answer begins. Raises
        ValueError when the model has no template or the template rejects the messages."""
        if self._chat_template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            return self._chat_template.render(
                messages=messages, add_generation_prompt=True, **self._special_tokens
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> Detokenizer:
        return Detokenizer(self.tokenizer, prompt_token_ids[-DETOKENIZE_CONTEXT_TOKENS:])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


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
