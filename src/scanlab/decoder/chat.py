"""Text in, text out: a model with its tokenizer, and a conversation streamed a token at a time.

`load_model` takes a known model's name (fetched on first use), a .gguf file or a transformers
directory. `Chat` keeps the conversation, renders it with the model's chat template and streams
each answer as text. Prompts are left-padded to a multiple of `PROMPT_BUCKET` tokens so a
conversation compiles once per bucket instead of once per turn.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder import pretrained
from scanlab.decoder.checkpoint import load_checkpoint
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.generate import stream
from scanlab.decoder.gguf_checkpoint import load_gguf
from scanlab.decoder.params import DecoderParams
from scanlab.decoder.tokenizer import Message, Tokenizer, load_tokenizer

PROMPT_BUCKET = 64
DTYPES = ("float32", "bfloat16")


class Model(NamedTuple):
    config: DecoderConfig
    params: DecoderParams
    tokenizer: Tokenizer


def load_model(source: str | os.PathLike, dtype: str = "float32") -> Model:
    """A model and its tokenizer from a known model's name, a .gguf file or a transformers
    directory; parameters in `dtype` ("float32" or "bfloat16")."""
    path = _resolve(source, dtype)
    tokenizer = load_tokenizer(path)  # first: a checkpoint without one fails before the weights
    return Model(*_load_weights(path, dtype), tokenizer)


def load_weights(source: str | os.PathLike, dtype: str = "float32"):
    """(config, params) of a known model's name, a .gguf file or a transformers directory."""
    return _load_weights(_resolve(source, dtype), dtype)


def _load_weights(path: Path, dtype: str):
    if path.is_dir():
        return load_checkpoint(path, dtype=dtype)
    return load_gguf(path, dtype=dtype)


def check_dtype(dtype: str) -> str:
    """A parameter dtype scanlab loads models in: one of DTYPES."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def _resolve(source: str | os.PathLike, dtype: str) -> Path:
    """The path of the model (a known name is fetched, once, first); the dtype checked before."""
    check_dtype(dtype)
    if str(source) in pretrained.MODELS:
        return pretrained.fetch(pretrained.MODELS[str(source)])
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"model must be a .gguf file, a checkpoint directory or one of "
            f"{sorted(pretrained.MODELS)}, got {str(source)!r}"
        )
    return path


def left_padded(rows: list[list[int]], pad_id: int, bucket: int = 1):
    """(B, S) tokens and their mask for B rows of ids, each padded on the left with `pad_id`;
    S is the longest row's length rounded up to a multiple of `bucket`."""
    length = -(-max(len(ids) for ids in rows) // bucket) * bucket
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for row, ids in enumerate(rows):
        tokens[row, length - len(ids) :], mask[row, length - len(ids) :] = ids, True
    return tokens, mask


def decode_stream(tokenizer: Tokenizer, chunks: Iterable[np.ndarray]) -> Iterator[str]:
    """Text pieces of one row's token chunks ((1, c) arrays), ending at its stop token.

    The whole answer is decoded again at each chunk and the new suffix yielded, held back while
    it ends in an incomplete UTF-8 character (a byte-level token can split one).
    """
    ids: list[int] = []
    shown = ""
    for chunk in chunks:
        for token in np.asarray(chunk)[0].tolist():
            ids.append(token)
            if token in tokenizer.eos_ids:
                break
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
        if ids and ids[-1] in tokenizer.eos_ids:
            return


@dataclasses.dataclass
class Chat:
    """A conversation with a model: `reply(text)` streams the answer and remembers both turns.

    Attributes:
      model: the Model.
      system: an optional system message opening the conversation.
      max_new_tokens: the longest answer, in tokens.
      sampling: generate's sampling keywords (temperature, top_k, top_p, min_p,
        repetition_penalty); empty for greedy answers.
      seed: the PRNG seed for sampling; each answer draws from a new subkey.
    """

    model: Model
    system: str | None = None
    max_new_tokens: int = 256
    sampling: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    messages: list[Message] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        # An answer must leave room for a prompt: refused now, not at the first question.
        checks.static_int(
            "max_new_tokens",
            self.max_new_tokens,
            minimum=1,
            maximum=self.model.config.max_seq_len - 1,
        )
        self._key = jnp.asarray(checks.seed_key(self.seed))
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids of the conversation with `text` as the next user turn."""
        messages = [*self.messages, {"role": "user", "content": text}]
        return self.model.tokenizer.encode(self.model.tokenizer.chat(messages))

    def reply(self, text: str) -> Iterator[str]:
        """Streams the answer to `text` as text pieces; the arguments are checked first."""
        config, params, tokenizer = self.model
        ids = self.prompt_ids(text)
        tokens, mask = left_padded([ids], tokenizer.pad_id, PROMPT_BUCKET)
        self._key, key = jax.random.split(self._key)
        chunks = stream(
            params,
            tokens,
            config,
            self.max_new_tokens,
            key=key if self.sampling.get("temperature") else None,
            attn_mask=jnp.asarray(mask),
            stop_tokens=tokenizer.eos_ids,
            pad_token=tokenizer.pad_id,
            **self.sampling,
        )
        return self._remembered(text, decode_stream(tokenizer, chunks))

    def _remembered(self, text: str, pieces: Iterator[str]) -> Iterator[str]:
        answer = []
        for piece in pieces:
            answer.append(piece)
            yield piece
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "".join(answer)},
        ]
