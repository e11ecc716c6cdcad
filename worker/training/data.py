"""Training data: JSON-lines rows in the formats TRL's SFTTrainer reads, tokenized and masked.

Three row formats, one per dataset (the first row decides):
  {"text": ...}                     every token is trained on;
  {"prompt": ..., "completion": ...} the completion only (the prompt is context);
  {"messages": [{"role", "content"}, ...]} through the tokenizer's chat template, the
                                    assistant turns only.
An end-of-sequence token closes a completion (as TRL does). Rows that keep no trained
token after truncation are dropped; a dataset left with none is refused before training.
Batches come in a seeded order that a resumed run replays from its position.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from schemas.errors import InvalidJob

IGNORE_INDEX = -100  # labels the loss skips (context, padding)
MAX_ROWS = 1_000_000
MAX_LINE_BYTES = 1 << 20
FORMATS = ("text", "prompt/completion", "messages")


@dataclass(frozen=True)
class Example:
    """One tokenized row: its ids and labels (IGNORE_INDEX where the loss does not look)."""

    ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        """Tokens the loss is computed on (a label is predicted from the token before it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


Row = tuple[int, dict[str, Any]]  # (line number, the object on it)


def read_rows(path: Path) -> list[Row]:
    """The JSON objects of a JSON-lines file, with their line numbers; InvalidJob says which
    line is wrong."""
    if not path.is_file():
        raise InvalidJob(f"dataset {path} is not a file: give a JSON-lines file of {{\"text\": ...}}, "
                         "{\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]} rows",
                         path=str(path))
    rows: list[Row] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES or len(rows) >= MAX_ROWS:
                raise InvalidJob(f"dataset {path} line {number} is over the limit ({MAX_LINE_BYTES} "
                                 f"bytes a line, {MAX_ROWS} lines)", path=str(path))
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidJob(f"dataset {path} line {number} is not JSON ({exc.msg})",
                                 path=str(path)) from None
            if not isinstance(row, dict):
                raise InvalidJob(f"dataset {path} line {number} must be a JSON object", path=str(path))
            rows.append((number, row))
    if not rows:
        raise InvalidJob(f"dataset {path} holds no lines", path=str(path))
    return rows


def row_format(row: dict[str, Any]) -> str:
    """Which of FORMATS a row is in (by its keys)."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt/completion"
    return "text"


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[Row], max_length: int,
                where: str) -> tuple[list[Example], int]:
    """Every row tokenized and masked; (the examples with a trained token, rows dropped).

    InvalidJob for a row in another format than the first, a malformed row, or a
    dataset in which no row keeps a trained token.
    """
    kind = row_format(rows[0][1])
    examples: list[Example] = []
    for number, row in rows:
        if row_format(row) != kind:
            raise InvalidJob(f"{where} line {number} is not in the {kind} format of its first line: "
                             "use one format per dataset", path=where)
        example = _encode(tokenizer, row, kind, f"{where} line {number}")
        example = Example(example.ids[:max_length], example.labels[:max_length])
        if example.trained:
            examples.append(example)
    if not examples:
        raise InvalidJob(f"{where}: no row leaves a single token to train on (after masking the "
                         f"{'prompts' if kind != 'text' else 'first token'} and truncating to "
                         f"max_length={max_length}): give longer rows", path=where)
    return examples, len(rows) - len(examples)


def _encode(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], kind: str, where: str) -> Example:
    if kind == "text":
        text = row.get("text")
        if not isinstance(text, str):
            raise InvalidJob(f"{where} must be an object with a string \"text\"", path=where)
        ids = _ids(tokenizer, text, special=True)
        return Example(ids, list(ids))
    if kind == "prompt/completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InvalidJob(f"{where} must have a string \"prompt\" and a string \"completion\"", path=where)
        context = _ids(tokenizer, prompt, special=True)
        ids = _with_eos(tokenizer, _ids(tokenizer, prompt + completion, special=True))
        cut = min(len(context), len(ids))
        return Example(ids, [IGNORE_INDEX] * cut + ids[cut:])
    return _encode_messages(tokenizer, row.get("messages"), where)


def _encode_messages(tokenizer: PreTrainedTokenizerBase, messages: Any, where: str) -> Example:
    """The conversation through the chat template; labels on the assistant turns alone, each
    found as the tokens its turn adds after the template's prompt for it."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InvalidJob(f"{where} must have \"messages\": a list of {{\"role\", \"content\"}} strings",
                         path=where)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidJob(f"{where}: the model's tokenizer has no chat template, so \"messages\" rows "
                         "cannot be rendered: use \"text\" or \"prompt\"/\"completion\" rows", path=where)
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = _ids(tokenizer, _render(tokenizer, chat, prompt=False), special=False)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, _render(tokenizer, chat[:turn], prompt=True), special=False))
        end = len(_ids(tokenizer, _render(tokenizer, chat[:turn + 1], prompt=False), special=False))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _render(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]], *, prompt: bool) -> str:
    if not chat:
        return ""
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    return str(text)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, int(eos)]


def batch_order(count: int, batch_size: int, seed: int, skip: int = 0) -> Iterator[list[int]]:
    """Endless batches of indices into `count` examples, each pass a seeded shuffle; the first
    `skip` batches passed over (a resumed run starts where its checkpoint stopped)."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    made = 0
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(count, generator=generator).tolist())
        batch, pending = pending[:batch_size], pending[batch_size:]
        made += 1
        if made > skip:
            yield batch


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (padding ignored by the loss)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids, dtype=torch.long)
        labels[row, :len(example.labels)] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, :len(example.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
