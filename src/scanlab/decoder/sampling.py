"""The next token from logits: a repetition penalty, then temperature, top-k, top-p and min-p.

Each transform is a pure function of (B, V) logits, written to equal the transformers logits
processor of the same name (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`) and applied in transformers' order.
Every setting is a traced value: changing one reuses the compiled program, and a setting at its
neutral value (top_k = V, top_p = 1, min_p = 0, penalty = 1) leaves the logits unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scanlab import checks

_REMOVED = -jnp.inf  # transformers' filter value


class Sampling(NamedTuple):
    """Sampling settings, each a traced scalar (see `settings` for the checked constructor)."""

    temperature: jax.Array  # () f32 > 0
    top_k: jax.Array  # () int32 in [1, V]
    top_p: jax.Array  # () f32 in (0, 1]
    min_p: jax.Array  # () f32 in [0, 1]
    repetition_penalty: jax.Array  # () f32 > 0


def settings(vocab_size: int, **options) -> Sampling:
    """Checked settings (`checks.sampling_options`: temperature, top_k, top_p, min_p,
    repetition_penalty); the defaults change nothing. temperature 0 means greedy decoding, which
    takes only the repetition penalty (the other settings keep the most likely token)."""
    checked = checks.sampling_options(vocab_size, **options)
    return Sampling(
        jnp.float32(checked["temperature"] or 1.0),
        jnp.int32(checked["top_k"] or vocab_size),
        jnp.float32(checked["top_p"]),
        jnp.float32(checked["min_p"]),
        jnp.float32(checked["repetition_penalty"]),
    )


def penalize_repetition(logits_BxV, seen_BxV, penalty) -> jax.Array:
    """Seen tokens' logits divided by the penalty when positive, multiplied when negative."""
    penalized_BxV = jnp.where(logits_BxV < 0, logits_BxV * penalty, logits_BxV / penalty)
    return jnp.where(seen_BxV, penalized_BxV, logits_BxV)


def keep_top_k(logits_BxV, top_k) -> jax.Array:
    """Removes logits below the k-th largest of their row (ties with it stay).

    A traced k cannot size `lax.top_k`, so the k-th largest is read from a sorted copy.
    """
    descending_BxV = -jnp.sort(-logits_BxV, axis=-1)
    kth_largest_Bx1 = jax.lax.dynamic_slice_in_dim(descending_BxV, top_k - 1, 1, axis=-1)
    return jnp.where(logits_BxV < kth_largest_Bx1, _REMOVED, logits_BxV)


def keep_top_p(logits_BxV, top_p) -> jax.Array:
    """Keeps the most likely tokens whose probabilities sum to top_p (at least one)."""
    ascending_BxV = jnp.sort(logits_BxV, axis=-1)
    cumulative_BxV = jnp.cumsum(jax.nn.softmax(ascending_BxV, axis=-1), axis=-1)
    removed_BxV = (cumulative_BxV <= 1 - top_p).at[:, -1].set(False)
    # The smallest kept logit: the first one not removed, in ascending order.
    first_kept_Bx1 = jnp.sum(removed_BxV, axis=-1, keepdims=True)
    threshold_Bx1 = jnp.take_along_axis(ascending_BxV, first_kept_Bx1, axis=-1)
    return jnp.where(logits_BxV < threshold_Bx1, _REMOVED, logits_BxV)


def keep_min_p(logits_BxV, min_p) -> jax.Array:
    """Removes tokens less likely than min_p times the most likely token."""
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    floor_Bx1 = min_p * jnp.max(probs_BxV, axis=-1, keepdims=True)
    return jnp.where(probs_BxV < floor_Bx1, _REMOVED, logits_BxV)


def warp(logits_BxV, seen_BxV, sampling: Sampling) -> jax.Array:
    """All transforms in transformers' order: the logits a token is drawn from."""
    logits_BxV = penalize_repetition(logits_BxV, seen_BxV, sampling.repetition_penalty)
    logits_BxV = logits_BxV / sampling.temperature
    logits_BxV = keep_top_k(logits_BxV, sampling.top_k)
    logits_BxV = keep_top_p(logits_BxV, sampling.top_p)
    return keep_min_p(logits_BxV, sampling.min_p)


def next_token(logits_BxV, seen_BxV, key, sampling: Sampling) -> jax.Array:
    """(B,) int32: without a key greedy (the argmax after the repetition penalty, which the other
    transforms keep), else a draw from the `warp`ed logits."""
    if key is None:
        logits_BxV = penalize_repetition(logits_BxV, seen_BxV, sampling.repetition_penalty)
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp(logits_BxV, seen_BxV, sampling), axis=-1).astype(
        jnp.int32
    )
