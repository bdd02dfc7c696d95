"""Text in, text out: a conversation with a model, streamed a token at a time.

`Chat` keeps the conversation, renders it with the model's chat template and streams
each answer as text. Prompts are left-padded to a multiple of `PROMPT_BUCKET` tokens so a
conversation compiles once per bucket instead of once per turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder.formats.tokenizer import NO_CHAT_TEMPLATE, Message, Tokenizer
from scanlab.decoder.generation import stream
from scanlab.decoder.load import Model
from scanlab.errors import ArgumentError

PROMPT_BUCKET = 64


def longest_answer(config) -> int:
    """The most new tokens a chat can ask for: the context less one prompt bucket."""
    return config.max_seq_len - PROMPT_BUCKET


def left_padded(rows: list[list[int]], pad_id: int, bucket: int = 1):
    """(B, S) tokens and their mask for B rows of ids, each padded on the left with `pad_id`;
    S is the longest row's length rounded up to a multiple of `bucket`."""
    length = -(-max(len(ids) for ids in rows) // bucket) * bucket
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for row, ids in enumerate(rows):
        tokens[row, length - len(ids) :], mask[row, length - len(ids) :] = ids, True
    return tokens, mask


class AnswerText:
    """One answer's text as its tokens arrive: `push` returns the text now safe to show.

    The whole answer is decoded again at each push and the new suffix given out, held back while
    it ends in an incomplete UTF-8 character (a byte-level token can split one) or in the
    beginning of a stop string, which is never shown: the answer ends before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string was found: the answer ends where it began

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """The text the new token ids add, or "" while held back; with `final`, all that is
        left (a stop string's beginning included: it did not come)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._show(text[:cut])
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self._stop_prefix(text)]
        return self._show(text)

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop string."""
        return max(
            (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )

    def _show(self, text: str) -> str:
        if len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece


def decode_stream(tokenizer: Tokenizer, chunks: Iterable[np.ndarray]) -> Iterator[str]:
    """Text pieces of one row's token chunks ((1, c) arrays), ending at its stop token
    (`AnswerText`, no stop strings)."""
    answer = AnswerText(tokenizer)
    for chunk in chunks:
        ids = []
        for token in np.asarray(chunk)[0].tolist():
            ids.append(token)
            if token in tokenizer.eos_ids:
                break
        piece = answer.push(ids)
        if piece:
            yield piece
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
        if self.model.tokenizer.chat_template is None:
            raise ArgumentError(f"Chat needs a chat template: {NO_CHAT_TEMPLATE}")
        # An answer must leave room for a prompt bucket: refused now, not at the first question.
        checks.static_int(
            "max_new_tokens",
            self.max_new_tokens,
            minimum=1,
            maximum=longest_answer(self.model.config),
        )
        self._key = jnp.asarray(checks.seed_key(self.seed))
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids of the conversation with `text` as the next user turn."""
        messages = [*self.messages, {"role": "user", "content": text}]
        tokenizer = self.model.tokenizer
        return tokenizer.encode(tokenizer.chat(messages), add_special_tokens=False)

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
