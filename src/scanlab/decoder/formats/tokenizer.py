"""Text <-> token ids: the checkpoint's own tokenizer through the `tokenizers` library, and its chat
template rendered by jinja2 as transformers renders it.

A transformers directory carries `tokenizer.json`, its special tokens in `tokenizer_config.json`
and the template in `chat_template.jinja` (or, written by older versions, `tokenizer_config.json`);
a GGUF file carries the byte-level BPE vocabulary and merges, the special tokens and the template
in its metadata, from which the same `tokenizers.Tokenizer` is built.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from scanlab.decoder.formats.base import CheckpointError, read_json
from scanlab.decoder.formats.gguf_file import metadata, open_gguf
from scanlab.errors import ArgumentError

Message = dict[str, str]  # {"role": "user", "content": "..."}

# llama.cpp's names of pre-tokenizers that split text as GPT-2's byte-level regex does; SmolLM's
# vocabulary has no merges between digits, so its "smollm" splitting of digits comes out the same.
GPT2_PRE_TOKENIZERS = ("default", "gpt2", "smollm")
_CONTROL = 3  # llama.cpp's token type of special tokens such as <|im_end|>


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A checkpoint's tokenizer.

    Attributes:
      backend: the `tokenizers.Tokenizer` doing the work.
      chat_template: the checkpoint's jinja2 chat template, or None.
      eos_ids: the token ids that end generation (end of text, end of turn).
      bos_token, eos_token: their spellings, as chat templates refer to them.
      pad_id: the id a finished row emits.
    """

    backend: tokenizers.Tokenizer
    chat_template: str | None
    eos_ids: tuple[int, ...]
    bos_token: str
    eos_token: str
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (<|im_start|>) stay whole."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """The text of token ids, special tokens left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the checkpoint's chat template, ready to encode."""
        if self.chat_template is None:
            raise ArgumentError("this checkpoint has no chat template; pass a plain text prompt")
        check_messages(messages)
        return (
            _environment()
            .from_string(self.chat_template)
            .render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        )


def check_messages(messages) -> None:
    """Each message a dict with string 'role' and 'content'."""
    if not isinstance(messages, list) or not messages:
        raise ArgumentError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ArgumentError(
                f"messages[{i}] must be a dict with string 'role' and 'content', got {message!r}"
            )


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _environment() -> jinja2.Environment:
    # transformers' settings, so a template renders to the same text as apply_chat_template.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    return env


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a .gguf file or of a transformers checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return _from_directory(path)
    return _from_gguf(path)


def _from_gguf(path: Path) -> Tokenizer:
    reader = open_gguf(path)
    kind = metadata(reader, "tokenizer.ggml.model")
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in GPT2_PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: the tokenizer must be byte-level BPE (tokenizer.ggml.model 'gpt2', "
            f"tokenizer.ggml.pre one of {list(GPT2_PRE_TOKENIZERS)}), got model={kind!r}, "
            f"pre={pre!r}"
        )
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    merges = metadata(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: the tokenizer's vocabulary or merges are missing")
    backend = tokenizers.Tokenizer(
        models.BPE(
            {token: i for i, token in enumerate(tokens)},
            [tuple(merge.split(" ", 1)) for merge in merges],
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    types = metadata(reader, "tokenizer.ggml.token_type", [])
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL
        ]
    )
    eos_id = metadata(reader, "tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.eos_token_id is missing")
    bos_id = metadata(reader, "tokenizer.ggml.bos_token_id", eos_id)
    eot_id = metadata(reader, "tokenizer.ggml.eot_token_id", eos_id)
    return Tokenizer(
        backend=backend,
        chat_template=metadata(reader, "tokenizer.chat_template"),
        eos_ids=tuple(dict.fromkeys((int(eos_id), int(eot_id)))),
        bos_token=tokens[bos_id],
        eos_token=tokens[eos_id],
        pad_id=int(metadata(reader, "tokenizer.ggml.padding_token_id", eos_id)),
    )


def _from_directory(directory: Path) -> Tokenizer:
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory} must contain tokenizer.json, the tokenizer")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{file} is not a readable tokenizer: {error}") from None
    settings = _json(directory / "tokenizer_config.json")
    generation = _json(directory / "generation_config.json")
    eos_token = _spelling(settings.get("eos_token"))
    eos_ids = generation.get("eos_token_id", backend.token_to_id(eos_token or ""))
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if None in eos_ids or not eos_ids:
        raise CheckpointError(f"{directory}: no end-of-sequence token is named")
    pad = _spelling(settings.get("pad_token"))
    template_file = directory / "chat_template.jinja"  # where transformers >= 4.54 writes it
    return Tokenizer(
        backend=backend,
        chat_template=(
            template_file.read_text() if template_file.is_file() else settings.get("chat_template")
        ),
        eos_ids=tuple(int(i) for i in eos_ids),
        bos_token=_spelling(settings.get("bos_token")) or "",
        eos_token=eos_token or backend.id_to_token(eos_ids[0]) or "",
        pad_id=_pad_id(backend, pad, eos_ids[0]),
    )


def _pad_id(backend: tokenizers.Tokenizer, pad: str | None, eos_id: int) -> int:
    """The id of the pad token tokenizer_config.json names, else the end-of-sequence id."""
    if not pad:
        return int(eos_id)
    pad_id = backend.token_to_id(pad)
    if pad_id is None:
        raise CheckpointError(f"pad_token {pad!r} is not in the tokenizer's vocabulary")
    return pad_id


def _spelling(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _json(path: Path) -> dict:
    """The JSON file's contents; an absent optional file is empty."""
    return read_json(path) if path.is_file() else {}
