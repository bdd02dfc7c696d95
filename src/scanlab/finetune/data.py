"""A user's examples as fixed-shape training rows: a JSONL file, tokenized once, padded.

Each line of the file is one example, all of one kind:
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the model's chat
  template; the loss falls on the assistant's turns only (their text and end-of-turn token,
  not the "assistant" header the template writes before them);
- text: `{"text": "..."}`, for completion; the loss falls on every token, the end-of-text token
  appended so the model learns where a text stops.

Rows are right-padded to one length S (a multiple of `LENGTH_MULTIPLE`, or the `seq_len`
asked for), so every step has the same shapes and compiles once. Every problem with a file is
one error naming the file and line, raised before any model weights load.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from scanlab import checks, storage
from scanlab.decoder.formats.tokenizer import NO_CHAT_TEMPLATE, Message, Tokenizer
from scanlab.errors import ArgumentError, MissingPathError

LENGTH_MULTIPLE = 16  # rows are padded to a multiple of this many tokens
KINDS = ("chat", "text")


class DataError(ArgumentError):
    """A data file that cannot be trained on: the message names the file and line."""


class Example(NamedTuple):
    ids: list[int]
    trained: list[bool]  # per token: it is a target of the loss
    line: int  # its line in the file, from 1


class Rows(NamedTuple):
    """Examples as (N, S) arrays: right-padded token ids, and which positions are targets.

    Attributes:
      tokens: int32 (N, S), padded with the tokenizer's pad id.
      targets: bool (N, S), True where the loss counts that token (it is predicted from the
        tokens before it); False on padding, prompts and the first token.
      mask: bool (N, S), True on real tokens (the attention's padding mask).
    """

    tokens: np.ndarray
    targets: np.ndarray
    mask: np.ndarray

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, rows: np.ndarray) -> Rows:
        return Rows(self.tokens[rows], self.targets[rows], self.mask[rows])


def read_jsonl(path: str | os.PathLike) -> tuple[str, list[tuple[int, dict]]]:
    """(kind, [(line number, record)]) of a JSONL file of examples, all of one kind (`KINDS`).

    Blank lines are skipped. Raises DataError naming the file and line of the first bad one.
    """
    path = checks.path_like("data_file", path)
    if not path.is_file():
        raise MissingPathError(
            f"{checks.shown('data_file')} must be a JSONL file, got {str(path)!r}"
        )
    records: list[tuple[int, dict]] = []
    kind = ""
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
        this_kind = _kind(record, path, number)
        if kind and this_kind != kind:
            raise DataError(
                f"{path}:{number}: a {this_kind} example in a file of {kind} examples (line "
                f"{records[0][0]}): one kind per file"
            )
        kind = this_kind
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no examples (one JSON object per line)")
    return kind, records


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _kind(record, path: Path, number: int) -> str:
    """ "chat" or "text", the record checked to be one of them."""
    where = f"{path}:{number}"
    if not isinstance(record, dict) or set(record) not in ({"messages"}, {"text"}):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f'{where}: an example must be {{"messages": [...]}} or {{"text": "..."}}, got {keys}'
        )
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise DataError(f"{where}: text must be a non-empty string")
        return "text"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and set(message) == {"role", "content"}
            and message["role"] in ("system", "user", "assistant")
            and isinstance(message["content"], str)
        ):
            raise DataError(
                f'{where}: messages[{i}] must be {{"role": "system"|"user"|"assistant", '
                f'"content": "..."}}, got {message!r}'
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message: nothing to learn from this conversation")
    return "chat"


def encode_chat(messages: list[Message], tokenizer: Tokenizer, where: str) -> Example:
    """Token ids of a conversation rendered by the chat template, the assistant turns trained.

    The rendering is split where each message starts, each piece tokenized on its own; an
    assistant piece is split again after the header the template writes with
    add_generation_prompt, which is not trained.
    """
    ids: list[int] = []
    trained: list[bool] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.chat(messages[:i], add_generation_prompt=True) if i else ""
            header = _piece(prompt, done, where)
            ids_header = tokenizer.encode(header, add_special_tokens=False)
            ids += ids_header
            trained += [False] * len(ids_header)
            done = prompt
        rendered = tokenizer.chat(messages[: i + 1], add_generation_prompt=False)
        piece_ids = tokenizer.encode(_piece(rendered, done, where), add_special_tokens=False)
        ids += piece_ids
        trained += [message["role"] == "assistant"] * len(piece_ids)
        done = rendered
    return Example(ids, trained, 0)


def _piece(rendered: str, done: str, where: str) -> str:
    """What the template added to `done` to render `rendered`."""
    if not rendered.startswith(done):
        raise DataError(
            f"{where}: the chat template renders this conversation's start differently once "
            "more messages follow, so its turns cannot be told apart"
        )
    return rendered[len(done) :]


def encode_text(text: str, tokenizer: Tokenizer) -> Example:
    """Token ids of a text (with what the tokenizer adds, e.g. a BOS) and the end-of-text id,
    every token trained."""
    ids = [*tokenizer.encode(text, add_special_tokens=True), tokenizer.eos_ids[0]]
    return Example(ids, [True] * len(ids), 0)


def encode_file(path: str | Path, tokenizer: Tokenizer) -> tuple[str, list[Example]]:
    """(kind, examples) of a JSONL file, tokenized (`read_jsonl`, then `encode`)."""
    kind, records = read_jsonl(path)
    return kind, encode(kind, records, tokenizer, path)


def encode(kind: str, records: list[tuple[int, dict]], tokenizer: Tokenizer, path) -> list[Example]:
    """The examples `read_jsonl` read, tokenized; chat examples need a chat template."""
    if kind == "chat" and tokenizer.chat_template is None:
        raise DataError(f"{path}: chat examples, but {NO_CHAT_TEMPLATE}")
    examples = []
    for number, record in records:
        if kind == "chat":
            example = encode_chat(record["messages"], tokenizer, f"{path}:{number}")
        else:
            example = encode_text(record["text"], tokenizer)
        examples.append(example._replace(line=number))
    return examples


def to_rows(examples: list[Example], pad_id: int, max_len: int, seq_len: int | None, path) -> Rows:
    """The examples as Rows of length S: `seq_len`, or the longest example's rounded up to a
    multiple of LENGTH_MULTIPLE (at most `max_len`, the model's context plus the one target
    no position predicts from)."""
    longest = max(examples, key=lambda example: len(example.ids))
    limit = max_len if seq_len is None else seq_len
    if len(longest.ids) > limit:
        what = f"seq_len={seq_len}" if seq_len is not None else f"the model's context ({max_len})"
        raise DataError(
            f"{path}:{longest.line}: {len(longest.ids)} tokens, longer than {what}: shorten it"
            " or split it"
        )
    if seq_len is None:
        seq_len = min(max_len, math.ceil(len(longest.ids) / LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
    tokens = np.full((len(examples), seq_len), pad_id, np.int32)
    targets = np.zeros((len(examples), seq_len), bool)
    mask = np.zeros((len(examples), seq_len), bool)
    for row, example in enumerate(examples):
        n = len(example.ids)
        tokens[row, :n], targets[row, :n], mask[row, :n] = example.ids, example.trained, True
    targets[:, 0] = False  # nothing predicts the first token
    return Rows(tokens, targets, mask)


# The held-out loss is computed after every chunk: beyond this many rows it costs more than the
# chunk it measures, and the rows serve better trained on.
MAX_HELD_OUT = 256


def split(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows | None]:
    """(training rows, held-out rows or None): a seeded shuffle, the last `eval_fraction` of it
    held out, at most `MAX_HELD_OUT` rows (at least one row when the fraction is above 0, and at
    least one row trained)."""
    if eval_fraction == 0.0:
        return rows, None
    order = np.random.default_rng(seed).permutation(len(rows))
    held = min(max(1, round(eval_fraction * len(rows))), len(rows) - 1, MAX_HELD_OUT)
    if held < 1:
        raise ArgumentError(
            f"{checks.shown('eval_fraction')}={eval_fraction} holds out examples, but the data "
            f"has only one: pass {checks.shown('eval_fraction')}=0"
        )
    return rows.take(np.sort(order[:-held])), rows.take(np.sort(order[-held:]))


def digest(path: str | Path) -> str:
    """The SHA-256 of a data file: a resumed run must train on the same examples."""
    return storage.digest(Path(path))
