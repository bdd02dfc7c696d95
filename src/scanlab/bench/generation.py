"""W5: generation with the KV cache vs recomputing the whole prefix for every new token."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from scanlab.bench.layers import block_config
from scanlab.decoder import DecoderConfig, DecoderParams, forward, generate, init_params
from scanlab.timing import time_call


class GenerationPoint(NamedTuple):
    batch: int
    prompt: int
    new_tokens: int
    cached_tokens_per_s: float
    recompute_tokens_per_s: float
    same_tokens: bool  # both ways produced the same greedy tokens


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate_by_recomputation(
    params: DecoderParams, prompt_BxS: jax.Array, *, config: DecoderConfig, max_new_tokens: int
) -> jax.Array:
    """Greedy decoding without a cache: every step reruns the full forward on a fixed buffer.

    Also one compiled `lax.scan` over tokens; the causal mask keeps the unwritten tail of the
    buffer from affecting the positions already written.
    """
    batch, prompt_length = prompt_BxS.shape
    buffer = jnp.zeros((batch, prompt_length + max_new_tokens), jnp.int32)
    buffer = buffer.at[:, :prompt_length].set(prompt_BxS)

    def step(buffer, position):
        logits = forward(params, buffer, config)
        next_token = jnp.argmax(logits[:, position - 1], axis=-1).astype(jnp.int32)
        return buffer.at[:, position].set(next_token), None

    positions = prompt_length + jnp.arange(max_new_tokens)
    return jax.lax.scan(step, buffer, positions)[0]


def measure(
    batch: int = 1,
    prompt: int = 16,
    new_tokens: int = 112,
    n_layers: int = 4,
    d_model: int = 256,
    repeats: int = 3,
) -> GenerationPoint:
    config = block_config(n_layers, d_model, prompt + new_tokens)
    params = init_params(config, jax.random.PRNGKey(0))
    prompt_BxS = jax.random.randint(jax.random.PRNGKey(1), (batch, prompt), 0, config.vocab_size)

    def cached():
        return generate(params, prompt_BxS, config, new_tokens).tokens

    def recompute():
        return generate_by_recomputation(
            params, prompt_BxS, config=config, max_new_tokens=new_tokens
        )

    cached_timing, recompute_timing = time_call(cached, repeats), time_call(recompute, repeats)
    same = bool(jnp.array_equal(cached(), recompute()))
    tokens = batch * new_tokens
    return GenerationPoint(
        batch,
        prompt,
        new_tokens,
        tokens / cached_timing.median_s,
        tokens / recompute_timing.median_s,
        same,
    )
