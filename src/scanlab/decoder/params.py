"""Decoder parameters as NamedTuples whose block leaves carry a leading layer axis.

The leaves' shapes, initialisation, placement and checkpoint layout are declared once, in
`scanlab.decoder.spec`; this module holds only the containers.

`DecoderBlock` holds all L layers at once, in the blog's layout (L=32, D=4096 for Llama 2 7B):

    DecoderBlock(input_norm=(L, D),
                 attention=Attention(q_proj=(L, D, R, K, Dh), k_proj=(L, D, K, Dh),
                                     v_proj=(L, D, K, Dh), out_proj=(L, R, K, Dh, D)),
                 mlp_norm=(L, D), gate_proj=(L, D, F), up_proj=(L, D, F),
                 down_proj=(L, F, D))

Optional leaves (None, an empty subtree, where a family has none; `scanlab.decoder.families`)
hold Qwen2's q/k/v biases and Gemma's q/k norms and sandwich norms.

`jax.lax.scan` over it hands the body one layer's slice: the same tree without the L axis.
Query head h of R·K heads is (r, k) = (h % R, h // R): query heads sharing key/value head k are
the consecutive R heads starting at k·R, as in transformers' `repeat_kv`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

import lazy_loader

# JAX is imported on first use: the family declarations built from these containers are read
# by the CLI's argument checks, before JAX starts.
if TYPE_CHECKING:
    import jax
else:
    jax = lazy_loader.load("jax")

# What the leaves are: arrays in parameters; a `Leaf` declaration, a shape or a PartitionSpec in
# the trees derived from the declarations (`scanlab.decoder.spec`). Unparameterized means any.
T = TypeVar("T")


class Attention(NamedTuple, Generic[T]):
    q_proj: T  # (L, D, R, K, Dh)
    k_proj: T  # (L, D, K, Dh)
    v_proj: T  # (L, D, K, Dh)
    out_proj: T  # (L, R, K, Dh, D)
    q_bias: T | None = None  # (L, R, K, Dh)
    k_bias: T | None = None  # (L, K, Dh)
    v_bias: T | None = None  # (L, K, Dh)
    q_norm: T | None = None  # (L, Dh): RMSNorm of each query head, before the rotation
    k_norm: T | None = None  # (L, Dh)


class DecoderBlock(NamedTuple, Generic[T]):
    input_norm: T  # (L, D): before attention
    attention: Attention[T]
    mlp_norm: T  # (L, D): before the MLP
    gate_proj: T  # (L, D, F)
    up_proj: T  # (L, D, F)
    down_proj: T  # (L, F, D)
    post_attn_norm: T | None = None  # (L, D): on attention's output, before the residual add
    post_mlp_norm: T | None = None  # (L, D): on the MLP's output, before the residual add


class DecoderParams(NamedTuple, Generic[T]):
    embed: T  # (V, D)
    blocks: DecoderBlock[T]  # every leaf (L, ...)
    final_norm: T  # (D,)
    lm_head: T | None  # (D, V); None when the embedding is tied


def outside_layers(tree: DecoderParams[T]) -> DecoderParams[T]:
    """The tree without its block leaves (blocks None): what lives outside the layer stack."""
    return tree._replace(blocks=None)  # type: ignore[arg-type]  # an empty subtree, on purpose


def stack_layers(layers: list[DecoderBlock]) -> DecoderBlock:
    """[L x per-layer DecoderBlock] -> one DecoderBlock with a leading layer axis."""
    return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *layers)


def unstack_layers(blocks: DecoderBlock) -> list[DecoderBlock]:
    """The inverse of `stack_layers`."""
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    return [jax.tree.map(lambda leaf, i=i: leaf[i], blocks) for i in range(n_layers)]
