"""The reference every served answer is held to: its prompt decoded alone by `generate`, on the
server tests' tiny models."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from tests.tiny import TINY

from scanlab.decoder import Model, generate

CONTEXT = 64
CONFIGS = {
    "llama": TINY,
    "gemma3-rings": dataclasses.replace(
        TINY, family="gemma3", n_layers=6, sliding_window=4, max_seq_len=CONTEXT
    ),
}
PROMPT_LENGTHS = (3, 9, 20)  # buckets 16, 16, 32
LONGEST = 30  # the most tokens any request here asks for


def alone(model: Model, prompt: list[int], budget: int, **sampling) -> list[int]:
    """`generate`'s new tokens for the prompt alone, up to and including its stop token."""
    tokenizer = model.tokenizer
    out = generate(
        model.params,
        jnp.asarray([prompt]),
        model.config,
        budget,
        stop_tokens=tokenizer.eos_ids,
        pad_token=tokenizer.pad_id,
        **sampling,
    )
    return np.asarray(out.tokens[0, len(prompt) :][: int(out.lengths[0])]).tolist()
