"""Generation with a KV cache: prefill, then `jax.lax.scan` over tokens with the layer scan inside.

The whole generation — prefill, the decode loop over tokens, the scan over layers in each step and
the sampling — is one compiled program per (config, prompt shape, max_new_tokens, greedy or
sampling); temperature and top_k are traced values.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.layers import LayerCache
from scanlab.decoder.model import check_mask, check_tokens, embed, unembed
from scanlab.decoder.params import DecoderParams
from scanlab.decoder.spec import check_params
from scanlab.decoder.stack import run_layers, split_key_nullable


class Generation(NamedTuple):
    tokens: jax.Array  # (B, S + N) int32: the prompt followed by the N new tokens
    logits: jax.Array  # (B, N, V) f32: the logits each new token was drawn from


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> LayerCache:
    """An empty cache for all layers: k and v of shape (L, B, T, K, Dh)."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _sample(logits_BxV, key, temperature, top_k) -> jax.Array:
    """Greedy without a key; else a draw from softmax(logits / temperature) over the top_k.

    temperature and top_k are traced: a new value reuses the compiled program. A traced top_k
    cannot size `lax.top_k`, so the k-th largest logit is read from a sorted copy.
    """
    if key is None:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    descending_BxV = -jnp.sort(-logits_BxV, axis=-1)
    kth_largest_Bx1 = jax.lax.dynamic_slice_in_dim(descending_BxV, top_k - 1, 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < kth_largest_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate(
    params, prompt_BxS, prompt_mask_BxS, key, temperature, top_k, *, config, max_new_tokens
):
    batch, prompt_length = prompt_BxS.shape
    cache = init_cache(config, batch, prompt_length + max_new_tokens, params.embed.dtype)
    # Rotary positions are the slots: a left-padded row is shifted as a whole, and attention
    # scores depend only on position differences, so it decodes as it would unpadded.
    positions_BxS = jnp.broadcast_to(jnp.arange(prompt_length), (batch, prompt_length))
    filled_BxT = jnp.concatenate([prompt_mask_BxS, jnp.ones((batch, max_new_tokens), bool)], 1)
    cache_length = prompt_length + max_new_tokens

    def layers(cache, tokens_BxS, positions_BxS):
        # Query at slot p sees every non-padding slot <= p; later slots are empty or stale.
        causal_BxSxT = jnp.arange(cache_length)[None, None, :] <= positions_BxS[:, :, None]
        mask_BxSxT = causal_BxSxT & filled_BxT[:, None, :]
        seq, cache = run_layers(
            params.blocks,
            embed(params, tokens_BxS),
            mask_BxSxT,
            config=config,
            positions_BxS=positions_BxS,
            cache=cache,
        )
        return unembed(params, seq[:, -1:], config)[:, 0], cache

    with jax.named_scope("prefill"):
        first_logits_BxV, cache = layers(cache, prompt_BxS, positions_BxS)
        key, subkey = split_key_nullable(key)
        first_token_B = _sample(first_logits_BxV, subkey, temperature, top_k)

    def decode_step(state, position):
        cache, token_B, key = state
        logits_BxV, cache = layers(cache, token_B[:, None], jnp.full((batch, 1), position))
        key, subkey = split_key_nullable(key)
        next_token_B = _sample(logits_BxV, subkey, temperature, top_k)
        return (cache, next_token_B, key), (next_token_B, logits_BxV)

    positions = prompt_length + jnp.arange(max_new_tokens - 1)
    with jax.named_scope("decode"):
        _, (tokens_NxB, logits_NxBxV) = jax.lax.scan(
            decode_step, (cache, first_token_B, key), positions
        )
    new_tokens_BxN = jnp.concatenate([first_token_B[:, None], tokens_NxB.T], axis=1)
    logits_BxNxV = jnp.concatenate([first_logits_BxV[:, None], logits_NxBxV.swapaxes(0, 1)], 1)
    return Generation(jnp.concatenate([prompt_BxS, new_tokens_BxN], axis=1), logits_BxNxV)


def generate(
    params: DecoderParams,
    tokens,
    config: DecoderConfig,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    attn_mask=None,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> Generation:
    """Continues each prompt row by `max_new_tokens` tokens.

    The arguments follow `forward`'s: params, tokens, config, then the generation's own.

    Args:
      params: DecoderParams (stacked blocks).
      tokens: (B, S) int token ids in [0, V), one prompt per row; shorter prompts left-padded.
      config: the model's DecoderConfig.
      max_new_tokens: N >= 1 new tokens per row; S + N <= config.max_seq_len.
      key: PRNG key, required when sampling (temperature > 0).
      attn_mask: (B, S), True for real prompt tokens, False for the left padding of shorter
        prompts (as transformers' attention_mask); default: no padding.
      temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature).
      top_k: sample only among the k most likely tokens (needs temperature > 0).

    temperature and top_k are traced: changing them does not recompile.
    """
    prompt_BxS = check_tokens("tokens", tokens, config)
    max_new_tokens = checks.static_int("max_new_tokens", max_new_tokens, minimum=1)
    total = prompt_BxS.shape[1] + max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(
            f"prompt length + max_new_tokens must be <= max_seq_len={config.max_seq_len}, "
            f"got {prompt_BxS.shape[1]} + {max_new_tokens} = {total}"
        )
    temperature = checks.finite_number("temperature", temperature, minimum=0.0)
    if temperature > 0 and key is None:
        raise ValueError("key must be a PRNG key when temperature > 0 (sampling), got None")
    if top_k is not None:
        if temperature == 0:
            raise ValueError(
                f"top_k needs temperature > 0 (greedy takes the top 1), got top_k={top_k}"
            )
        top_k = checks.static_int("top_k", top_k, minimum=1)
        if top_k > config.vocab_size:
            raise ValueError(f"top_k must be <= vocab_size={config.vocab_size}, got {top_k}")
    prompt_mask_BxS = _checked_prompt_mask(attn_mask, prompt_BxS.shape)
    check_params(params, config)
    sampling = temperature > 0
    return _generate(
        params,
        prompt_BxS,
        prompt_mask_BxS,
        key if sampling else None,
        jnp.float32(temperature if sampling else 1.0),
        jnp.int32(top_k or config.vocab_size),
        config=config,
        max_new_tokens=max_new_tokens,
    )


def _checked_prompt_mask(attn_mask, shape: tuple[int, int]) -> jax.Array:
    """The mask as bool (B, S); it must pad on the left and leave each row a real token."""
    if attn_mask is None:
        return jnp.ones(shape, bool)
    mask = np.asarray(check_mask(attn_mask, shape))
    empty = ~mask.any(axis=1)
    if empty.any():
        raise ValueError(
            "attn_mask must leave each row at least one real token, got row "
            f"{int(np.argmax(empty))} all padding"
        )
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError(
            "attn_mask must pad on the left (False before True in each row, the last token "
            "real), got a row with padding after a real token"
        )
    return jnp.asarray(mask)
