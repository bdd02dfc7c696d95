"""Decoder parameters as NamedTuples whose block leaves carry a leading layer axis.

The leaves' shapes, initialisation, placement and checkpoint layout are declared once, in
`scanlab.decoder.spec`; this module holds only the containers.

`DecoderBlock` holds all L layers at once, in the blog's layout (L=32, D=4096 for Llama 2 7B):

    DecoderBlock(input_norm=(L, D),
                 attention=Attention(q_proj=(L, D, R, K, Dh), k_proj=(L, D, K, Dh),
                                     v_proj=(L, D, K, Dh), out_proj=(L, R, K, Dh, D)),
                 post_attn_norm=(L, D), gate_proj=(L, D, F), up_proj=(L, D, F),
                 down_proj=(L, F, D))

`jax.lax.scan` over it hands the body one layer's slice: the same tree without the L axis.
Query head h of R·K heads is (r, k) = (h % R, h // R): query heads sharing key/value head k are
the consecutive R heads starting at k·R, as in transformers' `repeat_kv`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Attention(NamedTuple):
    q_proj: jax.Array  # (L, D, R, K, Dh)
    k_proj: jax.Array  # (L, D, K, Dh)
    v_proj: jax.Array  # (L, D, K, Dh)
    out_proj: jax.Array  # (L, R, K, Dh, D)
    # Biases of the Qwen2 family; None (an empty subtree) for Llama.
    q_bias: jax.Array | None = None  # (L, R, K, Dh)
    k_bias: jax.Array | None = None  # (L, K, Dh)
    v_bias: jax.Array | None = None  # (L, K, Dh)


class DecoderBlock(NamedTuple):
    input_norm: jax.Array  # (L, D)
    attention: Attention
    post_attn_norm: jax.Array  # (L, D)
    gate_proj: jax.Array  # (L, D, F)
    up_proj: jax.Array  # (L, D, F)
    down_proj: jax.Array  # (L, F, D)


class DecoderParams(NamedTuple):
    embed: jax.Array  # (V, D)
    blocks: DecoderBlock  # every leaf (L, ...)
    final_norm: jax.Array  # (D,)
    lm_head: jax.Array | None  # (D, V); None when the embedding is tied


def stack_layers(layers: list[DecoderBlock]) -> DecoderBlock:
    """[L x per-layer DecoderBlock] -> one DecoderBlock with a leading layer axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)


def unstack_layers(blocks: DecoderBlock) -> list[DecoderBlock]:
    """The inverse of `stack_layers`."""
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    return [jax.tree.map(lambda leaf, i=i: leaf[i], blocks) for i in range(n_layers)]
