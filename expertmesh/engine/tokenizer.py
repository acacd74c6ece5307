"""Text <-> token ids for the engine: a `tokenizers` wrapper, a byte-level fallback, chat templates,
incremental detokenization for streaming, and the EOS ids generation stops on.

`Tokenizer.from_pretrained(dir)` reads a Hugging Face checkpoint the way transformers'
`AutoTokenizer` does for a fast tokenizer, so ids and rendered prompts match it exactly (the tests
hold us to that); transformers itself is never imported here.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ByteTokenizer", "IncrementalDetokenizer", "Tokenizer", "load_eos_token_ids"]

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes that are not (yet) valid UTF-8


# For checkpoints that ship no chat template (base models): one "role: content" line per message, then
# "assistant:" to prompt the reply. The BOS text leads when the tokenizer has one, as chat templates do.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token is defined %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Tokenizer:
    """Encode, decode and render chat prompts for one checkpoint.

    A rendered chat prompt already holds the BOS text when the template writes it (DeepSeek's does):
    encode it with `add_special_tokens=False`, as transformers' `apply_chat_template(tokenize=True)` does.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer | None,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled_template: jinja2.Template | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) from `model_dir`;
        without a `tokenizer.json`, a `ByteTokenizer` sized from `config.json`."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ValueError(f"model directory {str(model_dir)!r} does not exist")
        config = _read_json(model_dir / "tokenizer_config.json")
        chat_template = _chat_template_from(config, model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            vocab_size = _read_json(model_dir / "config.json").get("vocab_size") or ByteTokenizer.MIN_VOCAB_SIZE
            return ByteTokenizer(vocab_size=max(vocab_size, ByteTokenizer.MIN_VOCAB_SIZE), chat_template=chat_template)
        # `add_bos_token` is informational here: like transformers, when a tokenizer.json exists its
        # post-processor alone decides whether BOS is prepended.
        backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return Tokenizer(
            backend,
            chat_template=chat_template,
            bos_token=_token_content(config.get("bos_token"), "bos_token"),
            eos_token=_token_content(config.get("eos_token"), "eos_token"),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (may be < the model's)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._backend.token_to_id(self.eos_token)

    @property
    def all_special_ids(self) -> list[int]:
        added = self._backend.get_added_tokens_decoder()
        ids = {i for i, token in added.items() if token.special}
        ids.update(i for i in (self.bos_token_id, self.eos_token_id) if i is not None)
        return sorted(ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) to the prompt text, with the checkpoint's
        chat template, or `DEFAULT_CHAT_TEMPLATE` (plain "role: content" lines) when it has none."""
        _validate_messages(messages)
        if self._compiled_template is None:
            template = self.chat_template if self.chat_template is not None else DEFAULT_CHAT_TEMPLATE
            self._compiled_template = _jinja_environment().from_string(template)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return self._compiled_template.render(
            messages=messages,
            tools=None,  # templates test `tools is not none`; an undefined name would pass that test
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{name: value for name, value in special.items() if value is not None},
        )


class ByteTokenizer(Tokenizer):
    """Fallback for checkpoints without a tokenizer: ids 0..255 are the raw UTF-8 bytes of the text,
    256 is BOS and 257 EOS; ids from 256 up (up to `vocab_size`) decode to nothing."""

    MIN_VOCAB_SIZE = 258

    def __init__(self, *, vocab_size: int = MIN_VOCAB_SIZE, chat_template: str | None = None) -> None:
        if not isinstance(vocab_size, int) or vocab_size < self.MIN_VOCAB_SIZE:
            raise ValueError(f"ByteTokenizer vocab_size must be an int >= {self.MIN_VOCAB_SIZE}, got {vocab_size!r}")
        super().__init__(None, chat_template=chat_template)
        self._vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int:
        return 256

    @property
    def eos_token_id(self) -> int:
        return 257

    @property
    def all_special_ids(self) -> list[int]:
        return [256, 257]


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text pieces, for streaming and stop strings.

    A piece is emitted only once its characters are complete: a multi-byte UTF-8 character split
    across tokens is held back (no U+FFFD) until its last byte arrives. The last few prompt ids, if
    given, are decoded as context so that decoders which drop a leading space at the start of a
    string keep it. After `flush()`, `text` equals `tokenizer.decode(generated ids)`.
    """

    _CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-self._CONTEXT_TOKENS :]) if prompt_ids else []
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []  # an unfinished character in the prompt must not swallow generated bytes
        self._ids = context  # ids from the first not-yet-final token on, preceded by context
        self._prefix_offset = 0  # self._ids[prefix:read] decodes to text already emitted
        self._read_offset = len(context)
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", sometimes several chars)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of stream: emit any held-back tail, with U+FFFD for bytes that never completed."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        if len(current) <= len(emitted) or (current.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        delta = current[len(emitted) :]
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""


def load_eos_token_ids(model_dir: str | Path) -> list[int]:
    """The ids that end generation: `generation_config.json`'s `eos_token_id`, else `config.json`'s."""
    model_dir = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        if eos is None:
            continue
        ids = [eos] if isinstance(eos, int) else eos
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{model_dir / name}: eos_token_id must be an int or a list of ints, got {eos!r}")
        return list(ids)
    return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(token: str | dict | None, field: str) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ..., ...}."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise ValueError(f"tokenizer_config.json: {field} must be a string or {{'content': str}}, got {token!r}")


def _chat_template_from(config: dict[str, Any], model_dir: Path) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():  # as in transformers, a template file wins over the config entry
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        names = sorted(map(str, named))
        raise ValueError(f"tokenizer_config.json: chat_template list has no 'default' entry (names: {names})")
    raise ValueError(
        "tokenizer_config.json: chat_template must be a string or a list of {name, template}, "
        f"got {type(template).__name__}"
    )


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else f"a {type(messages).__name__}"
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                got = "missing" if field not in message else f"a {type(message[field]).__name__}"
                raise ValueError(f"messages[{i}].{field} must be a string, got {got}")


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    # Sandboxed: chat templates come with downloaded checkpoints and are untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env
