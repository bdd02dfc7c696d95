"""The Llama decoder block as pure functions of one layer's parameters.

RMSNorm -> grouped-query attention with rotary embeddings -> residual -> RMSNorm -> SwiGLU ->
residual. Shapes use the package's letters; `T` here is the number of key/value positions
(S without a cache, the cache length with one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.params import Attention, DecoderBlock


class LayerCache(NamedTuple):
    """One layer's keys and values for every cached position."""

    k: jax.Array  # (B, T, K, Dh)
    v: jax.Array  # (B, T, K, Dh)


def rms_norm(x_BxSxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    # Statistics in f32 whatever the activation dtype: a bf16 mean of squares loses the scale.
    x = x_BxSxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return _lift(weight_D, x.ndim) * x.astype(x_BxSxD.dtype)


def _lift(vector: jax.Array, ndim: int) -> jax.Array:
    """(N,) -> (1, ..., 1, N) of rank `ndim`, so broadcasting over leading axes is explicit."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


def rope_phases(positions_BxS: jax.Array, head_dim: int, theta: float):
    """cos and sin of the rotary phases, each (B, S, Dh), in f32 (phases reach 1e5+ radians)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    phase_BxSxHalf = positions_BxS.astype(jnp.float32)[..., None] * _lift(inv_freq, 3)
    phase_BxSxDh = jnp.concatenate([phase_BxSxHalf, phase_BxSxHalf], axis=-1)
    return jnp.cos(phase_BxSxDh), jnp.sin(phase_BxSxDh)


def apply_rope(x: jax.Array, cos_BxSxDh: jax.Array, sin_BxSxDh: jax.Array) -> jax.Array:
    """Rotates x (B, S, ..., Dh) by the phases, in transformers' half-split convention.

    The two halves of Dh form the (real, imaginary) pairs, as in `rotate_half`; Meta's original
    checkpoints interleave pairs instead, and transformers' conversion permutes q/k to match this.
    """
    extra_axes = (1,) * (x.ndim - 3)
    cos = cos_BxSxDh.reshape(*cos_BxSxDh.shape[:2], *extra_axes, -1)
    sin = sin_BxSxDh.reshape(*sin_BxSxDh.shape[:2], *extra_axes, -1)
    # In f32 whatever the activation dtype: the phases are f32, and so is transformers' rotation.
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(
    attn: Attention,
    x_BxSxD: jax.Array,
    positions_BxS: jax.Array,
    attn_mask_BxSxT: jax.Array,
    config: DecoderConfig,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """Grouped-query self-attention: R query heads share each of the K key/value heads.

    With a cache, the new keys and values are written at `positions` and the queries attend over
    the whole cache (the mask hides slots not yet written).

    Returns:
      (B, S, D) output, and the updated cache (None without one).
    """
    q_BxSxRxKxDh = _plus_bias(jnp.einsum("bsd,drkh->bsrkh", x_BxSxD, attn.q_proj), attn.q_bias)
    k_BxSxKxDh = _plus_bias(jnp.einsum("bsd,dkh->bskh", x_BxSxD, attn.k_proj), attn.k_bias)
    v_BxSxKxDh = _plus_bias(jnp.einsum("bsd,dkh->bskh", x_BxSxD, attn.v_proj), attn.v_bias)
    cos, sin = rope_phases(positions_BxS, config.head_dim, config.rope_theta)
    q_BxSxRxKxDh = apply_rope(q_BxSxRxKxDh, cos, sin)
    k_BxSxKxDh = apply_rope(k_BxSxKxDh, cos, sin)
    if cache is not None:
        cache = _write(cache, k_BxSxKxDh, v_BxSxKxDh, positions_BxS)
        k_BxTxKxDh, v_BxTxKxDh = cache
    else:
        k_BxTxKxDh, v_BxTxKxDh = k_BxSxKxDh, v_BxSxKxDh
    # Scores and softmax in f32, masked with finfo.min rather than -inf so a fully masked row
    # stays finite.
    scores_BxRxKxSxT = jnp.einsum(
        "bsrkh,btkh->brkst", q_BxSxRxKxDh, k_BxTxKxDh, preferred_element_type=jnp.float32
    )
    scores_BxRxKxSxT = scores_BxRxKxSxT * config.head_dim**-0.5
    mask = attn_mask_BxSxT[:, None, None, :, :]
    scores_BxRxKxSxT = jnp.where(mask, scores_BxRxKxSxT, jnp.finfo(jnp.float32).min)
    probs_BxRxKxSxT = jax.nn.softmax(scores_BxRxKxSxT, axis=-1).astype(v_BxTxKxDh.dtype)
    out_BxSxRxKxDh = jnp.einsum("brkst,btkh->bsrkh", probs_BxRxKxSxT, v_BxTxKxDh)
    return jnp.einsum("bsrkh,rkhd->bsd", out_BxSxRxKxDh, attn.out_proj), cache


def _plus_bias(x_BxSx: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x (B, S, ...) + bias (...), the bias lifted explicitly; no bias (Llama): x."""
    return x_BxSx if bias is None else x_BxSx + bias.reshape((1, 1, *bias.shape))


def _write(cache: LayerCache, k_BxSxKxDh, v_BxSxKxDh, positions_BxS) -> LayerCache:
    """Scatters the S new keys/values of each row into its cache slots `positions`."""
    rows_Bx1 = jnp.arange(positions_BxS.shape[0])[:, None]
    return LayerCache(
        cache.k.at[rows_Bx1, positions_BxS].set(k_BxSxKxDh.astype(cache.k.dtype)),
        cache.v.at[rows_Bx1, positions_BxS].set(v_BxSxKxDh.astype(cache.v.dtype)),
    )


def swiglu(block: DecoderBlock, x_BxSxD: jax.Array) -> jax.Array:
    gate_BxSxF = jax.nn.silu(x_BxSxD @ block.gate_proj)
    return (gate_BxSxF * (x_BxSxD @ block.up_proj)) @ block.down_proj


def _dropout(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def decoder_block(
    block: DecoderBlock,
    seq_BxSxD: jax.Array,
    attn_mask_BxSxT: jax.Array,
    key: jax.Array | None = None,
    *,
    config: DecoderConfig,
    positions_BxS: jax.Array | None = None,
    cache: LayerCache | None = None,
):
    """One pre-norm Llama block on one layer's parameters (leaves without the L axis).

    Args:
      block: this layer's DecoderBlock.
      seq_BxSxD: the residual stream.
      attn_mask_BxSxT: True where query s may attend to key position t.
      key: PRNG key for residual dropout; None (inference) means no dropout.
      config: the static DecoderConfig.
      positions_BxS: rotary positions; default 0..S-1.
      cache: this layer's KV cache, for decoding.

    Returns:
      (seq, cache): the new residual stream (B, S, D) and the updated cache (None without one).
    """
    if positions_BxS is None:
        positions_BxS = jnp.broadcast_to(jnp.arange(seq_BxSxD.shape[1]), seq_BxSxD.shape[:2])
    attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
    with jax.named_scope("attention"):
        h = rms_norm(seq_BxSxD, block.input_norm, config.norm_eps)
        h, cache = attention(block.attention, h, positions_BxS, attn_mask_BxSxT, config, cache)
        seq_BxSxD = seq_BxSxD + _dropout(h, attn_key, config.dropout_rate)
    with jax.named_scope("mlp"):
        h = swiglu(block, rms_norm(seq_BxSxD, block.post_attn_norm, config.norm_eps))
        seq_BxSxD = seq_BxSxD + _dropout(h, mlp_key, config.dropout_rate)
    return seq_BxSxD, cache
