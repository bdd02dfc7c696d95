"""Synthetic tasks whose batches are drawn on the device from a PRNG key, inside the scanned step.

Each example is one token sequence: a prompt of P tokens, then the T target tokens the model must
produce. Training uses next-token loss on the target positions; evaluation asks the model to
generate the targets from the prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import lazy_loader
import numpy as np

# JAX is imported when a batch is first drawn: a TrainConfig (which looks its task up here) is
# checked without it, so the CLI's flag checks answer before JAX starts.
if TYPE_CHECKING:
    import jax
else:
    jax = lazy_loader.load("jax")

from scanlab.checks import shown
from scanlab.errors import ArgumentError


class Task(NamedTuple):
    name: str
    vocab_size: int
    prompt_length: int  # P, separator included
    target_length: int  # T
    sample: Callable[[jax.Array, int], jax.Array]  # (key, B) -> (B, P + T) int32 tokens
    describe: Callable[[np.ndarray], tuple[str, str]]  # (P + T,) tokens -> (question, answer) text

    @property
    def length(self) -> int:
        return self.prompt_length + self.target_length


# --- sequence reversal: x1 .. xn SEP -> xn .. x1 ------------------------------------------------

REVERSE_DIGITS, REVERSE_LENGTH = 10, 8
REVERSE_SEP = REVERSE_DIGITS
_REVERSE_SYMBOLS = "0123456789|"


def _sample_reverse(key: jax.Array, batch: int) -> jax.Array:
    digits_BxT = jax.random.randint(
        key, (batch, REVERSE_LENGTH), 0, REVERSE_DIGITS, jax.numpy.int32
    )
    sep_Bx1 = jax.numpy.full((batch, 1), REVERSE_SEP, jax.numpy.int32)
    return jax.numpy.concatenate([digits_BxT, sep_Bx1, digits_BxT[:, ::-1]], axis=1)


def _text(tokens, symbols: str) -> str:
    """Token ids as one character each: a model may emit a separator where a digit belongs."""
    return "".join(symbols[int(t)] for t in tokens)


def _describe_reverse(tokens) -> tuple[str, str]:
    digits = _text(tokens[:REVERSE_LENGTH], _REVERSE_SYMBOLS)
    return f"reverse {digits}", _text(tokens[REVERSE_LENGTH + 1 :], _REVERSE_SYMBOLS)


# --- addition: a + b with D digits each, the sum written least significant digit first -----------

ADD_DIGITS = 3
ADD_PLUS, ADD_EQUALS = 10, 11
_ADD_SYMBOLS = "0123456789+="


def _digits_msb_first(n_B: jax.Array, count: int) -> jax.Array:
    powers = 10 ** jax.numpy.arange(count - 1, -1, -1, dtype=jax.numpy.int32)
    return (n_B[:, None] // powers[None, :]) % 10


def _sample_add(key: jax.Array, batch: int) -> jax.Array:
    a_key, b_key = jax.random.split(key)
    a_B = jax.random.randint(a_key, (batch,), 0, 10**ADD_DIGITS, jax.numpy.int32)
    b_B = jax.random.randint(b_key, (batch,), 0, 10**ADD_DIGITS, jax.numpy.int32)
    # The sum least significant digit first: each output digit depends on digits already seen.
    sum_lsb_first = _digits_msb_first(a_B + b_B, ADD_DIGITS + 1)[:, ::-1]
    return jax.numpy.concatenate(
        [
            _digits_msb_first(a_B, ADD_DIGITS),
            jax.numpy.full((batch, 1), ADD_PLUS, jax.numpy.int32),
            _digits_msb_first(b_B, ADD_DIGITS),
            jax.numpy.full((batch, 1), ADD_EQUALS, jax.numpy.int32),
            sum_lsb_first,
        ],
        axis=1,
    )


def _describe_add(tokens) -> tuple[str, str]:
    a = _text(tokens[:ADD_DIGITS], _ADD_SYMBOLS)
    b = _text(tokens[ADD_DIGITS + 1 : 2 * ADD_DIGITS + 1], _ADD_SYMBOLS)
    answer = _text(tokens[2 * ADD_DIGITS + 2 :], _ADD_SYMBOLS)[::-1]
    return f"{a} + {b}", answer


TASKS: dict[str, Task] = {
    "reverse": Task(
        "reverse",
        REVERSE_DIGITS + 1,
        REVERSE_LENGTH + 1,
        REVERSE_LENGTH,
        _sample_reverse,
        _describe_reverse,
    ),
    "add": Task("add", 12, 2 * ADD_DIGITS + 2, ADD_DIGITS + 1, _sample_add, _describe_add),
}


def task_by_name(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ArgumentError(
            f"{shown('task')} must be one of {sorted(TASKS)}, got {name!r}"
        ) from None
