"""The decoder block as pure functions of one layer's parameters.

norm -> grouped-query attention with rotary embeddings [-> norm] -> residual -> norm -> gated
MLP [-> norm] -> residual; the bracketed ("sandwich") norms and RMS norms of the q and k heads
where the family declares them (Gemma 3). What a layer attends over is a function, `Attend`: the
S new keys themselves (`self_attend`, training and `forward`) or a KV cache
(`scanlab.decoder.cache`). Every weight matrix is used through `scanlab.decoder.weights.project`:
dense or kept quantized, the block is the same code. Shapes use the package's letters; `T` is
the number of key positions (S without a cache, the cache's slots with one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder import rope
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import SLIDING
from scanlab.decoder.params import Attention, DecoderBlock
from scanlab.decoder.weights import project

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# (q (B, S, R, K, Dh), k (B, S, K, Dh), v (B, S, K, Dh)) -> (attended values (B, S, R, K, Dh),
# whatever the attention updated: a cache, or None).
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class LayerKind(NamedTuple):
    """A layer's attention settings: one layer's, or stacked (L, ...) in the layer scan's inputs.

    Layers that differ only in these (Gemma 3's sliding and full ones, SmolLM3's layers without
    rotary) run as one scan body.
    """

    window: jax.Array  # int32 (): a query attends keys fewer than `window` positions before it
    inv_freq: jax.Array  # float32 (Dh/2,): each rotary pair's angle per position (`rope`)
    rope_factor: jax.Array  # float32 (): what the rotation's cos and sin are scaled by


def layer_kinds(config: DecoderConfig) -> LayerKind:
    """Every layer's LayerKind, stacked (L, ...); full layers' window is max_seq_len (no
    limit), layers without rotary have frequencies 0 (the identity rotation)."""
    sliding = np.array([kind == SLIDING for kind in config.layer_types])
    window = np.where(sliding, config.sliding_window or 0, config.max_seq_len)
    rotations = {
        False: (config.rope_theta, config.rope_scaling),
        True: (config.local_rope_theta, config.local_rope_scaling),
    }
    inv_freq = np.stack(
        [rope.inverse_frequencies(config.head_dim, *rotations[bool(s)]) for s in sliding]
    )
    factor = np.array([rope.attention_factor(rotations[bool(s)][1]) for s in sliding])
    inv_freq[list(config.no_rope_layers)], factor[list(config.no_rope_layers)] = 0.0, 1.0
    return LayerKind(
        jnp.asarray(window, jnp.int32),
        jnp.asarray(inv_freq, jnp.float32),
        jnp.asarray(factor, jnp.float32),
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the last axis of x (..., N) with weight (N,): by w, or by 1 + w (Gemma).

    Statistics in f32 whatever the activation dtype: a bf16 mean of squares loses the scale.
    Gemma scales in f32 before casting back, Llama after: each as transformers does.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + _lift(weight.astype(jnp.float32), x.ndim))).astype(x.dtype)
    return _lift(weight, x.ndim) * normed.astype(x.dtype)


def _lift(vector: jax.Array, ndim: int) -> jax.Array:
    """(N,) -> (1, ..., 1, N) of rank `ndim`, so broadcasting over leading axes is explicit."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


def rope_phases(positions_BxS: jax.Array, inv_freq: jax.Array, factor=1.0):
    """cos and sin of the rotary phases, each (B, S, Dh), in f32 (phases reach 1e5+ radians),
    scaled by `factor`; `inv_freq` (Dh/2,) and `factor` may be traced (a layer's LayerKind)."""
    phase_BxSxHalf = positions_BxS.astype(jnp.float32)[..., None] * _lift(inv_freq, 3)
    phase_BxSxDh = jnp.concatenate([phase_BxSxHalf, phase_BxSxHalf], axis=-1)
    return jnp.cos(phase_BxSxDh) * factor, jnp.sin(phase_BxSxDh) * factor


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


def project_qkv(
    attn: Attention, x_BxSxD: jax.Array, positions_BxS: jax.Array, kind: LayerKind, config
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q (B, S, R, K, Dh), k and v (B, S, K, Dh): projected, normed where declared, rotated."""
    q_BxSxRxKxDh = _plus_bias(project("bsd,drkh->bsrkh", x_BxSxD, attn.q_proj), attn.q_bias)
    k_BxSxKxDh = _plus_bias(project("bsd,dkh->bskh", x_BxSxD, attn.k_proj), attn.k_bias)
    v_BxSxKxDh = _plus_bias(project("bsd,dkh->bskh", x_BxSxD, attn.v_proj), attn.v_bias)
    q_BxSxRxKxDh = _norm(q_BxSxRxKxDh, attn.q_norm, config)
    k_BxSxKxDh = _norm(k_BxSxKxDh, attn.k_norm, config)
    cos, sin = rope_phases(positions_BxS, kind.inv_freq, kind.rope_factor)
    return apply_rope(q_BxSxRxKxDh, cos, sin), apply_rope(k_BxSxKxDh, cos, sin), v_BxSxKxDh


def _plus_bias(x_BxSx: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x (B, S, ...) + bias (...), the bias lifted explicitly; no bias (Llama): x."""
    return x_BxSx if bias is None else x_BxSx + bias.reshape((1, 1, *bias.shape))


def attend(
    q_BxSxRxKxDh: jax.Array,
    k_BxTxKxDh: jax.Array,
    v_BxTxKxDh: jax.Array,
    mask_BxSxT: jax.Array,
    scale: float,
) -> jax.Array:
    """Softmax attention (B, S, R, K, Dh): R query heads share each of the K key/value heads.

    Scores and softmax in f32, masked with finfo.min rather than -inf so a fully masked row
    stays finite.
    """
    scores_BxRxKxSxT = jnp.einsum(
        "bsrkh,btkh->brkst", q_BxSxRxKxDh, k_BxTxKxDh, preferred_element_type=jnp.float32
    )
    scores_BxRxKxSxT = scores_BxRxKxSxT * scale
    mask = mask_BxSxT[:, None, None, :, :]
    scores_BxRxKxSxT = jnp.where(mask, scores_BxRxKxSxT, jnp.finfo(jnp.float32).min)
    probs_BxRxKxSxT = jax.nn.softmax(scores_BxRxKxSxT, axis=-1).astype(v_BxTxKxDh.dtype)
    return jnp.einsum("brkst,btkh->bsrkh", probs_BxRxKxSxT, v_BxTxKxDh)


def within_window(
    mask_BxSxT: jax.Array, query_positions_BxS: jax.Array, key_positions_BxT: jax.Array, window
) -> jax.Array:
    """The mask, also False where the key is `window` or more positions before the query."""
    distance_BxSxT = query_positions_BxS[:, :, None] - key_positions_BxT[:, None, :]
    return mask_BxSxT & (distance_BxSxT < window)


def self_attend(
    mask_BxSxS: jax.Array, positions_BxS: jax.Array, kind: LayerKind, config: DecoderConfig
) -> Attend:
    """Attention of the S tokens over themselves (no cache), within the layer's window."""
    mask_BxSxS = within_window(mask_BxSxS, positions_BxS, positions_BxS, kind.window)

    def attend_new(q, k, v):
        return attend(q, k, v, mask_BxSxS, config.query_scale), None

    return attend_new


def gated_mlp(block: DecoderBlock, x_BxSxD: jax.Array, activation: str) -> jax.Array:
    """down(act(gate(x)) * up(x)): SwiGLU for SiLU, GeGLU for GELU."""
    gate_BxSxF = ACTIVATIONS[activation](project("bsd,df->bsf", x_BxSxD, block.gate_proj))
    up_BxSxF = project("bsd,df->bsf", x_BxSxD, block.up_proj)
    return project("bsf,fd->bsd", gate_BxSxF * up_BxSxF, block.down_proj)


def _dropout(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _norm(x: jax.Array, weight: jax.Array | None, config: DecoderConfig) -> jax.Array:
    """RMSNorm in the family's form where it declares the norm; x unchanged where it does not
    (q/k and sandwich norms outside Gemma)."""
    if weight is None:
        return x
    return rms_norm(x, weight, config.norm_eps, config.features.norm_plus_one)


def decoder_block(
    block: DecoderBlock,
    seq_BxSxD: jax.Array,
    attend_fn: Attend,
    key: jax.Array | None = None,
    *,
    config: DecoderConfig,
    positions_BxS: jax.Array,
    kind: LayerKind,
):
    """One pre-norm block on one layer's parameters (leaves without the L axis).

    Args:
      block: this layer's DecoderBlock.
      seq_BxSxD: the residual stream.
      attend_fn: what the layer's queries attend over (`self_attend`, or a cache's).
      key: PRNG key for residual dropout; None (inference) means no dropout.
      config: the static DecoderConfig.
      positions_BxS: rotary positions.
      kind: the layer's LayerKind (its rotation; `attend_fn` holds its window).

    Returns:
      (seq, aux): the new residual stream (B, S, D) and what `attend_fn` updated.
    """
    attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
    with jax.named_scope("attention"):
        h = _norm(seq_BxSxD, block.input_norm, config)
        q, k, v = project_qkv(block.attention, h, positions_BxS, kind, config)
        out_BxSxRxKxDh, aux = attend_fn(q, k, v)
        h = project("bsrkh,rkhd->bsd", out_BxSxRxKxDh, block.attention.out_proj)
        h = _norm(h, block.post_attn_norm, config)
        seq_BxSxD = seq_BxSxD + _dropout(h, attn_key, config.dropout_rate)
    with jax.named_scope("mlp"):
        h = _norm(seq_BxSxD, block.mlp_norm, config)
        h = _norm(gated_mlp(block, h, config.features.activation), block.post_mlp_norm, config)
        seq_BxSxD = seq_BxSxD + _dropout(h, mlp_key, config.dropout_rate)
    return seq_BxSxD, aux
