"""The decoder forward pass: the layer stack over embedded tokens, and its Python-loop twin.

`forward` and `forward_loop` check their arguments, then call one compiled program per static
signature (config, remat, shapes and dtypes): there is no need to wrap them in `jax.jit`, and
calling them under an outer `jax.jit` inlines them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder import weights
from scanlab.decoder.config import DecoderConfig, check_config
from scanlab.decoder.layers import rms_norm
from scanlab.decoder.params import DecoderParams
from scanlab.decoder.spec import check_params
from scanlab.decoder.stack import check_remat, run_layers
from scanlab.errors import ArgumentError, ArgumentTypeError


def causal_mask(attn_mask_BxS: jax.Array | None, batch: int, length: int) -> jax.Array:
    """(B, S, S) True where query s may attend key t: t <= s, and t is not padding."""
    mask_SxS = jnp.tril(jnp.ones((length, length), bool))
    mask_BxSxS = jnp.broadcast_to(mask_SxS, (batch, length, length))
    if attn_mask_BxS is not None:
        mask_BxSxS = mask_BxSxS & attn_mask_BxS.astype(bool)[:, None, :]
    return mask_BxSxS


def embed(params: DecoderParams, tokens_BxS: jax.Array, config: DecoderConfig) -> jax.Array:
    """(B, S) ids -> (B, S, D) vectors; times sqrt(D) in the weights' dtype where the family
    scales them (Gemma)."""
    seq_BxSxD = weights.embed_rows(params.embed, tokens_BxS)
    if config.features.embed_scale:
        seq_BxSxD = seq_BxSxD * jnp.asarray(config.d_model**0.5, seq_BxSxD.dtype)
    return seq_BxSxD


def unembed(params: DecoderParams, seq_BxSxD: jax.Array, config: DecoderConfig) -> jax.Array:
    """Final RMSNorm and output head: (B, S, D) -> (B, S, V) logits, accumulated in f32."""
    with jax.named_scope("unembed"):
        x = rms_norm(seq_BxSxD, params.final_norm, config.norm_eps, config.features.norm_plus_one)
        head = weights.tied_head(params.embed) if params.lm_head is None else params.lm_head
        return weights.head_logits(x, head)


@functools.partial(jax.jit, static_argnames=("config", "remat", "loop"))
def _forward(params, tokens_BxS, key, attn_mask_BxS, *, config, remat, loop):
    batch, length = tokens_BxS.shape
    mask = causal_mask(attn_mask_BxS, batch, length)
    with jax.named_scope("embed"):
        seq = embed(params, tokens_BxS, config)
    seq = run_layers(params.blocks, seq, mask, config=config, key=key, remat=remat, loop=loop)
    return unembed(params, seq, config)


def forward(
    params: DecoderParams,
    tokens,
    config: DecoderConfig,
    *,
    key: jax.Array | None = None,
    attn_mask=None,
    remat: str = "none",
) -> jax.Array:
    """Logits (B, S, V) float32 for token ids (B, S), the layers run by `jax.lax.scan`.

    Args:
      params: DecoderParams whose block leaves have the leading layer axis.
      tokens: (B, S) int token ids in [0, V).
      config: the DecoderConfig (static: one compiled program per config).
      key: PRNG key for dropout (training); None for inference.
      attn_mask: optional (B, S) padding mask, True/1 for real tokens.
      remat: what the backward pass recomputes, a name in `scanlab.decoder.stack.REMAT`.
    """
    return _checked_forward(params, tokens, config, key, attn_mask, remat, loop=False)


def forward_loop(
    params: DecoderParams,
    tokens,
    config: DecoderConfig,
    *,
    key: jax.Array | None = None,
    attn_mask=None,
    remat: str = "none",
) -> jax.Array:
    """The Python-loop twin of `forward`: same arguments, same numbers, L traced blocks."""
    return _checked_forward(params, tokens, config, key, attn_mask, remat, loop=True)


def _checked_forward(params, tokens, config, key, attn_mask, remat, loop):
    check_config(config, ("tokens", tokens))
    tokens_BxS = check_tokens("tokens", tokens, config)
    checks.prng_key("key", key, optional=True)
    check_params(params, config)
    check_remat(remat, loop)
    attn_mask_BxS = None if attn_mask is None else check_mask(attn_mask, tokens_BxS.shape)
    return _forward(params, tokens_BxS, key, attn_mask_BxS, config=config, remat=remat, loop=loop)


def check_tokens(name: str, tokens, config: DecoderConfig) -> jax.Array:
    """Token ids as an int32 (B, S) array, B >= 1, S in [1, max_seq_len], ids in [0, V) when
    concrete.

    An id outside the vocabulary would be clamped silently by the embedding gather.
    """
    shown = checks.shown(name)
    if isinstance(tokens, DecoderParams):
        raise ArgumentTypeError(
            f"{shown} is a DecoderParams: the parameters come first (params, tokens, config)"
        )
    try:
        array = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    except ValueError:  # ragged rows
        raise ArgumentTypeError(
            f"{shown} must be token ids of shape (B, S), got a {type(tokens).__name__} whose "
            "rows differ in length"
        ) from None
    if array.ndim != 2 or not array.shape[0]:
        raise ArgumentError(
            f"{shown} must have shape (B, S) with B >= 1, got shape {tuple(array.shape)}"
        )
    if array.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{shown} must be integer token ids, got dtype {array.dtype}")
    if not 1 <= array.shape[1] <= config.max_seq_len:
        raise ArgumentError(
            f"{shown} must have 1 <= S <= max_seq_len={config.max_seq_len}, got S={array.shape[1]}"
        )
    if not isinstance(array, jax.core.Tracer) and array.size:
        values = np.asarray(array)
        bad = (values < 0) | (values >= config.vocab_size)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ArgumentError(
                f"{shown} must be ids in [0, vocab_size={config.vocab_size}), got "
                f"{name}[{index[0]}, {index[1]}] = {int(values[index])}"
            )
    return jnp.asarray(array, jnp.int32)


def check_mask(attn_mask, shape: tuple[int, ...]) -> jax.Array:
    """A (B, S) padding mask as bool, of the tokens' shape: bool, or integers 0/1 as
    transformers' attention_mask.

    A float mask is refused rather than cast: an additive mask (0 where attended, -inf where not)
    cast to bool is inverted.
    """
    mask = attn_mask if isinstance(attn_mask, jax.Array) else np.asarray(attn_mask)
    if tuple(mask.shape) != tuple(shape):
        raise ArgumentError(
            f"attn_mask must have the tokens' shape {tuple(shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype.kind not in "biu":
        raise ArgumentTypeError(
            f"attn_mask must be boolean (True for real tokens) or integers 0/1, got dtype "
            f"{mask.dtype}; an additive mask (0 / -inf) converts with attn_mask == 0"
        )
    if mask.dtype.kind != "b" and not isinstance(mask, jax.core.Tracer):
        values = np.unique(np.asarray(mask))
        if not np.isin(values, (0, 1)).all():
            raise ArgumentError(
                f"attn_mask must hold only 0 and 1 (or be boolean), got {values[:5].tolist()}"
            )
    return jnp.asarray(mask).astype(bool)
