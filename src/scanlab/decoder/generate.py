"""Generation with a KV cache: prefill, then `jax.lax.scan` over tokens with the layer scan inside.

The whole generation — prefill, the decode loop over tokens, the scan over layers in each step and
the sampling — is one compiled program per (config, prompt shape, max_new_tokens, sampling mode).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.layers import LayerCache, decoder_block
from scanlab.decoder.model import embed, split_key_nullable, unembed
from scanlab.decoder.params import DecoderBlock, DecoderParams, check_params


class Generation(NamedTuple):
    tokens: jax.Array  # (B, S + N) int32: the prompt followed by the N new tokens
    logits: jax.Array  # (B, N, V) f32: the logits each new token was drawn from


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> LayerCache:
    """An empty cache for all layers: k and v of shape (L, B, T, K, Dh)."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def run_layers_cached(
    blocks: DecoderBlock,
    cache: LayerCache,
    seq_BxSxD: jax.Array,
    positions_BxS: jax.Array,
    filled_BxT: jax.Array,
    config: DecoderConfig,
) -> tuple[jax.Array, LayerCache]:
    """The layer scan for decoding: xs are (layer params, layer cache), ys the updated caches.

    The S new tokens go to cache slots `positions`; `filled` is False for padding slots.
    """
    cache_length = cache.k.shape[2]
    # Query at slot p sees every non-padding slot <= p; later slots are empty or stale.
    causal_BxSxT = jnp.arange(cache_length)[None, None, :] <= positions_BxS[:, :, None]
    mask_BxSxT = causal_BxSxT & filled_BxT[:, None, :]

    def inner(seq, layer):
        block, layer_cache = layer
        seq, layer_cache = decoder_block(
            block,
            seq,
            mask_BxSxT,
            config=config,
            positions_BxS=positions_BxS,
            cache=layer_cache,
        )
        return seq, layer_cache

    return jax.lax.scan(inner, seq_BxSxD, (blocks, cache))


def _sample(logits_BxV, key, temperature: float, top_k: int | None) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_k is not None:
        kth_largest_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_largest_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k"))
def _generate(
    params, prompt_BxS, prompt_mask_BxS, key, *, config, max_new_tokens, temperature, top_k
):
    batch, prompt_length = prompt_BxS.shape
    cache = init_cache(config, batch, prompt_length + max_new_tokens, params.embed.dtype)
    # Rotary positions are the slots: a left-padded row is shifted as a whole, and attention
    # scores depend only on position differences, so it decodes as it would unpadded.
    positions_BxS = jnp.broadcast_to(jnp.arange(prompt_length), (batch, prompt_length))
    filled_BxT = jnp.concatenate([prompt_mask_BxS, jnp.ones((batch, max_new_tokens), bool)], 1)
    seq, cache = run_layers_cached(
        params.blocks, cache, embed(params, prompt_BxS), positions_BxS, filled_BxT, config
    )
    first_logits_BxV = unembed(params, seq[:, -1:], config)[:, 0]
    key, subkey = split_key_nullable(key)
    first_token_B = _sample(first_logits_BxV, subkey, temperature, top_k)

    def decode_step(state, position):
        cache, token_B, key = state
        positions_Bx1 = jnp.full((batch, 1), position)
        seq, cache = run_layers_cached(
            params.blocks, cache, embed(params, token_B[:, None]), positions_Bx1, filled_BxT, config
        )
        logits_BxV = unembed(params, seq, config)[:, 0]
        key, subkey = split_key_nullable(key)
        next_token_B = _sample(logits_BxV, subkey, temperature, top_k)
        return (cache, next_token_B, key), (next_token_B, logits_BxV)

    positions = prompt_length + jnp.arange(max_new_tokens - 1)
    _, (tokens_NxB, logits_NxBxV) = jax.lax.scan(
        decode_step, (cache, first_token_B, key), positions
    )
    new_tokens_BxN = jnp.concatenate([first_token_B[:, None], tokens_NxB.T], axis=1)
    logits_BxNxV = jnp.concatenate([first_logits_BxV[:, None], logits_NxBxV.swapaxes(0, 1)], 1)
    return Generation(jnp.concatenate([prompt_BxS, new_tokens_BxN], axis=1), logits_BxNxV)


def generate(
    params: DecoderParams,
    config: DecoderConfig,
    prompt_BxS,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    prompt_mask_BxS=None,
) -> Generation:
    """Continues each prompt row by `max_new_tokens` tokens.

    Args:
      params: DecoderParams (stacked blocks).
      config: the model's DecoderConfig.
      prompt_BxS: int token ids, one prompt per row; shorter prompts left-padded (any id).
      max_new_tokens: N >= 1 new tokens per row; S + N <= config.max_seq_len.
      key: PRNG key, required when sampling (temperature > 0).
      temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature).
      top_k: sample only among the k most likely tokens.
      prompt_mask_BxS: True for real prompt tokens, False for the left padding of shorter
        prompts (as transformers' attention_mask); default: no padding.
    """
    prompt_BxS = jnp.asarray(prompt_BxS)
    if prompt_BxS.ndim != 2 or not jnp.issubdtype(prompt_BxS.dtype, jnp.integer):
        raise ValueError(
            f"prompt must be integer token ids of shape (B, S), got {prompt_BxS.dtype} "
            f"{tuple(prompt_BxS.shape)}"
        )
    max_new_tokens = checks.static_int("max_new_tokens", max_new_tokens, minimum=1)
    total = prompt_BxS.shape[1] + max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(
            f"prompt length + max_new_tokens must be <= max_seq_len={config.max_seq_len}, "
            f"got {prompt_BxS.shape[1]} + {max_new_tokens} = {total}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("key must be a PRNG key when temperature > 0 (sampling), got None")
    if top_k is not None:
        top_k = checks.static_int("top_k", top_k, minimum=1)
        if top_k > config.vocab_size:
            raise ValueError(f"top_k must be <= vocab_size={config.vocab_size}, got {top_k}")
    prompt_mask_BxS = _checked_prompt_mask(prompt_mask_BxS, prompt_BxS.shape)
    check_params(params, config)
    return _generate(
        params,
        prompt_BxS.astype(jnp.int32),
        prompt_mask_BxS,
        key if temperature > 0 else None,
        config=config,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
    )


def _checked_prompt_mask(prompt_mask_BxS, shape: tuple[int, int]) -> jax.Array:
    """The mask as bool (B, S); it must pad on the left and leave each row a real token."""
    if prompt_mask_BxS is None:
        return jnp.ones(shape, bool)
    mask = np.asarray(prompt_mask_BxS).astype(bool)
    if mask.shape != shape:
        raise ValueError(f"prompt_mask must have the prompt's shape {shape}, got {mask.shape}")
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError(
            "prompt_mask must pad on the left (False before True in each row, the last token "
            "real), got a row with padding after a real token"
        )
    return jnp.asarray(mask)
