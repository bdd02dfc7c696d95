"""The decoder forward pass: `jax.lax.scan` over the stacked layers, and its Python-loop twin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.layers import decoder_block, rms_norm
from scanlab.decoder.params import DecoderBlock, DecoderParams, check_params, unstack


def split_key_nullable(key: jax.Array | None):
    """`jax.random.split(key)`, passing `None` (no randomness, e.g. inference) through."""
    if key is None:
        return None, None
    key, subkey = jax.random.split(key)
    return key, subkey


def causal_mask(attn_mask_BxS: jax.Array | None, batch: int, length: int) -> jax.Array:
    """(B, S, S) True where query s may attend key t: t <= s, and t is not padding."""
    mask_SxS = jnp.tril(jnp.ones((length, length), bool))
    mask_BxSxS = jnp.broadcast_to(mask_SxS, (batch, length, length))
    if attn_mask_BxS is not None:
        mask_BxSxS = mask_BxSxS & attn_mask_BxS.astype(bool)[:, None, :]
    return mask_BxSxS


def embed(params: DecoderParams, tokens_BxS: jax.Array) -> jax.Array:
    return params.embed[tokens_BxS]


def unembed(params: DecoderParams, seq_BxSxD: jax.Array, config: DecoderConfig) -> jax.Array:
    """Final RMSNorm and output head: (B, S, D) -> (B, S, V) logits in f32."""
    x = rms_norm(seq_BxSxD, params.final_norm, config.norm_eps)
    head_DxV = params.embed.T if params.lm_head is None else params.lm_head
    return (x @ head_DxV).astype(jnp.float32)


def _block_fn(config: DecoderConfig, remat: bool):
    """`decoder_block` for this config; with remat, its activations are recomputed in the
    backward pass instead of stored."""
    block_fn = functools.partial(decoder_block, config=config)
    return jax.checkpoint(block_fn) if remat else block_fn


def run_layers(
    blocks: DecoderBlock,
    seq_BxSxD: jax.Array,
    attn_mask_BxSxS: jax.Array,
    *,
    config: DecoderConfig,
    key: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """All L layers by one `jax.lax.scan` over the stacked blocks: one compiled block body.

    The scan state is `(key, seq)`; each layer gets its own subkey (None at inference).
    """
    block_fn = _block_fn(config, remat)

    def inner(state, input_):
        key, seq = state
        key, subkey = split_key_nullable(key)
        seq = block_fn(input_, seq, attn_mask_BxSxS, subkey)
        return (key, seq), None

    (_, seq_BxSxD), _ = jax.lax.scan(inner, (key, seq_BxSxD), blocks)
    return seq_BxSxD


def run_layers_loop(
    blocks: DecoderBlock,
    seq_BxSxD: jax.Array,
    attn_mask_BxSxS: jax.Array,
    *,
    config: DecoderConfig,
    key: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """The Python-loop twin of `run_layers`: the same keys, L copies of the block when traced."""
    block_fn = _block_fn(config, remat)
    for layer in unstack(blocks):
        key, subkey = split_key_nullable(key)
        seq_BxSxD = block_fn(layer, seq_BxSxD, attn_mask_BxSxS, subkey)
    return seq_BxSxD


def _forward(run, params, tokens_BxS, config, key, attn_mask_BxS, remat):
    _check_tokens(tokens_BxS, config)
    check_params(params, config)
    batch, length = tokens_BxS.shape
    mask = causal_mask(attn_mask_BxS, batch, length)
    seq = run(params.blocks, embed(params, tokens_BxS), mask, config=config, key=key, remat=remat)
    return unembed(params, seq, config)


def forward(
    params: DecoderParams,
    tokens_BxS: jax.Array,
    config: DecoderConfig,
    key: jax.Array | None = None,
    attn_mask_BxS: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """Logits (B, S, V) f32 for tokens (B, S), the layers run by `jax.lax.scan`.

    Args:
      params: DecoderParams whose block leaves have the leading layer axis.
      tokens_BxS: int token ids.
      config: static; pass it with `jax.jit(forward, static_argnames=("config", "remat"))`.
      key: PRNG key for dropout (training); None for inference.
      attn_mask_BxS: optional padding mask, True/1 for real tokens.
      remat: recompute each block's activations in the backward pass (`jax.checkpoint`).
    """
    return _forward(run_layers, params, tokens_BxS, config, key, attn_mask_BxS, remat)


def forward_loop(
    params: DecoderParams,
    tokens_BxS: jax.Array,
    config: DecoderConfig,
    key: jax.Array | None = None,
    attn_mask_BxS: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """The Python-loop twin of `forward`: same arguments, same numbers."""
    return _forward(run_layers_loop, params, tokens_BxS, config, key, attn_mask_BxS, remat)


def _check_tokens(tokens_BxS, config: DecoderConfig) -> None:
    if tokens_BxS.ndim != 2:
        raise ValueError(f"tokens must have shape (B, S), got shape {tuple(tokens_BxS.shape)}")
    if not jnp.issubdtype(tokens_BxS.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens_BxS.dtype}")
    if tokens_BxS.shape[1] > config.max_seq_len:
        raise ValueError(
            f"tokens must have S <= max_seq_len={config.max_seq_len}, got S={tokens_BxS.shape[1]}"
        )
