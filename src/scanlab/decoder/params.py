"""Decoder parameters as NamedTuples whose block leaves carry a leading layer axis.

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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder.config import DecoderConfig


class Attention(NamedTuple):
    q_proj: jax.Array  # (L, D, R, K, Dh)
    k_proj: jax.Array  # (L, D, K, Dh)
    v_proj: jax.Array  # (L, D, K, Dh)
    out_proj: jax.Array  # (L, R, K, Dh, D)


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


def layer_shapes(config: DecoderConfig) -> DecoderBlock:
    """The shape of each block leaf for one layer (as seen inside the layer scan)."""
    D, R, K, Dh, F = (
        config.d_model,
        config.n_rep,
        config.n_kv_heads,
        config.head_dim,
        config.mlp_dim,
    )
    return DecoderBlock(
        input_norm=(D,),
        attention=Attention(
            q_proj=(D, R, K, Dh), k_proj=(D, K, Dh), v_proj=(D, K, Dh), out_proj=(R, K, Dh, D)
        ),
        post_attn_norm=(D,),
        gate_proj=(D, F),
        up_proj=(D, F),
        down_proj=(F, D),
    )


def _is_shape(node) -> bool:
    return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


def stacked_shapes(config: DecoderConfig) -> DecoderBlock:
    """`layer_shapes` with the leading layer axis L."""
    return jax.tree.map(lambda s: (config.n_layers, *s), layer_shapes(config), is_leaf=_is_shape)


def _init_scales(config: DecoderConfig) -> DecoderParams:
    """Std of each normal-initialised leaf, 1/sqrt(fan-in); None marks norms, which start at 1."""
    D, F = config.d_model, config.mlp_dim
    attention_width = config.n_heads * config.head_dim
    return DecoderParams(
        embed=1.0,
        blocks=DecoderBlock(
            input_norm=None,
            attention=Attention(D**-0.5, D**-0.5, D**-0.5, attention_width**-0.5),
            post_attn_norm=None,
            gate_proj=D**-0.5,
            up_proj=D**-0.5,
            down_proj=F**-0.5,
        ),
        final_norm=None,
        lm_head=None if config.tie_embeddings else D**-0.5,
    )


def param_shapes(config: DecoderConfig) -> DecoderParams:
    """The shape of every leaf, blocks with their leading layer axis L."""
    return DecoderParams(
        embed=(config.vocab_size, config.d_model),
        blocks=stacked_shapes(config),
        final_norm=(config.d_model,),
        lm_head=None if config.tie_embeddings else (config.d_model, config.vocab_size),
    )


def _init_tree(shapes, scales, key: jax.Array, dtype):
    """Arrays for a tree of shapes: ones where the scale is None, else normal * scale.

    All the normals come from one `jax.random.normal` call split into leaves: XLA compiles the
    random-bit generator once instead of once per leaf shape (seconds on a CPU).
    """
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    scales = treedef.flatten_up_to(scales)
    sizes = [math.prod(shape) for shape in leaves]
    normals = jnp.split(jax.random.normal(key, (sum(sizes),), dtype), np.cumsum(sizes)[:-1])
    return treedef.unflatten(
        [
            jnp.ones(shape, dtype) if scale is None else (normal * scale).reshape(shape)
            for shape, scale, normal in zip(leaves, scales, normals, strict=True)
        ]
    )


def init_params(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderParams:
    """All parameters: norms at 1, every other leaf normal with std 1/sqrt(fan-in)."""
    return _init_tree(param_shapes(config), _init_scales(config), key, dtype)


def init_layer(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderBlock:
    """One layer's parameters (no L axis), initialised as `init_params` initialises each layer."""
    return _init_tree(layer_shapes(config), _init_scales(config).blocks, key, dtype)


def init_outside_layers(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderParams:
    """The parameters outside the layer stack (embed, final_norm, lm_head); blocks is None."""
    shapes = param_shapes(config)._replace(blocks=None)
    return _init_tree(shapes, _init_scales(config)._replace(blocks=None), key, dtype)


def stack(layers: list[DecoderBlock]) -> DecoderBlock:
    """[L x per-layer DecoderBlock] -> one DecoderBlock with a leading layer axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)


def unstack(blocks: DecoderBlock) -> list[DecoderBlock]:
    """The inverse of `stack`."""
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    return [jax.tree.map(lambda leaf, i=i: leaf[i], blocks) for i in range(n_layers)]


def param_count(config: DecoderConfig) -> int:
    """Number of parameters, computed from shapes alone (nothing allocated)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def check_params(params: DecoderParams, config: DecoderConfig) -> None:
    """Raises ValueError naming the first leaf whose shape is not the one `config` implies."""
    expected = param_shapes(config)
    if not isinstance(params, DecoderParams):
        raise TypeError(f"params must be a DecoderParams, got {type(params).__name__}")
    if (params.lm_head is None) != config.tie_embeddings:
        raise ValueError(
            f"params.lm_head must be {'None' if config.tie_embeddings else 'an array'} "
            f"for tie_embeddings={config.tie_embeddings}"
        )
    want = jax.tree_util.tree_flatten_with_path(expected, is_leaf=_is_shape)[0]
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    if len(want) != len(got):
        raise ValueError(f"params has {len(got)} leaves, expected {len(want)}")
    for (path, shape), (_, leaf) in zip(want, got, strict=True):
        name = "params" + jax.tree_util.keystr(path)
        if tuple(leaf.shape) == shape:
            continue
        if ".blocks" in name and leaf.shape[:1] != shape[:1]:
            raise ValueError(
                f"{name} has {leaf.shape[0] if leaf.ndim else 'no'} layers on its leading axis, "
                f"expected n_layers={config.n_layers}: shape {tuple(leaf.shape)}, expected {shape}"
            )
        raise ValueError(f"{name} has shape {tuple(leaf.shape)}, expected {shape}")
