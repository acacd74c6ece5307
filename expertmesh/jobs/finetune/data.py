"""Training examples from a JSONL file: token ids and, per position, the label the loss learns (or
IGNORE_INDEX where there is nothing to learn: the prompt of a completion, the user's turns of a chat).

Formats (`data.format`), one JSON object a line:
- text:       {"text": "..."}: the loss on every token; BOS as the tokenizer adds it, EOS appended.
- completion: {"prompt": "...", "completion": "..."}: the loss on the completion (and its EOS) only.
- chat:       {"messages": [{"role", "content"}, ...]}: rendered with the checkpoint's chat template; the
              loss on the assistant's turns only (what the template writes for them, up to the next turn).

Every problem is found before training starts and named by its line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from expertmesh.engine.tokenizer import Tokenizer
from expertmesh.jobs.finetune.config import DataConfig

IGNORE_INDEX = -100  # a label the loss skips (PyTorch's cross_entropy default)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def load_examples(config: DataConfig, tokenizer: Tokenizer, eos_token_id: int | None) -> list[Example]:
    path = Path(config.path)
    if not path.is_file():
        raise ValueError(f"data.path {path} does not exist")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
            ids, labels = _PARTS[config.format](record, tokenizer, eos_token_id, where)
            ids, labels = ids[:config.max_seq_len], labels[:config.max_seq_len]
            example = Example(ids, labels)
            if example.num_loss_tokens == 0:
                raise ValueError(f"{where}: nothing to learn within data.max_seq_len={config.max_seq_len} "
                                 "(the prompt fills it, or the example has no tokens to predict)")
            examples.append(example)
    if not examples:
        raise ValueError(f"data.path {path} holds no examples")
    return examples


def _field(record: dict, name: str, where: str, kind: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: a {kind} example needs a non-empty string {name!r}, got {value!r}")
    return value


def _text(record, tokenizer, eos, where):
    ids = tokenizer.encode(_field(record, "text", where, "text")) + ([eos] if eos is not None else [])
    return ids, list(ids)


def _completion(record, tokenizer, eos, where):
    prompt = tokenizer.encode(_field(record, "prompt", where, "completion"))
    answer = tokenizer.encode(_field(record, "completion", where, "completion"), add_special_tokens=False)
    answer += [eos] if eos is not None else []
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _chat(record, tokenizer, eos, where):
    """Renders the conversation one turn at a time: the text each assistant turn adds to the rendering is
    learnt, the rest (system, user, the template's own framing) is context. Each piece is tokenized on
    its own, so the loss boundary falls exactly between two pieces."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a chat example needs a non-empty list 'messages', got {messages!r}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError(f"{where}: a chat example needs at least one assistant message to learn from")
    try:
        pieces: list[tuple[str, bool]] = []  # (text, learnt)
        done = ""
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise ValueError("the checkpoint's chat template does not render a conversation as a prefix of "
                                 "its continuation, so the assistant's turns cannot be told apart")
            pieces += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        whole = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        pieces.append((whole[len(done):], False))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ids, labels = [], []
    for text, learnt in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        labels += piece if learnt else [IGNORE_INDEX] * len(piece)
    return ids, labels


_PARTS = {"text": _text, "completion": _completion, "chat": _chat}
