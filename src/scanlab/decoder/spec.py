"""One declaration per parameter leaf: everything else about a parameter is derived from it.

`SPEC` is a `DecoderParams` whose leaves are `Leaf` declarations. From it come the shapes
(`param_shapes`, the `eval_shape` listing), initialisation (`init_params`), validation
(`check_params`), placement on a mesh (`param_specs`), the transformers checkpoint names and
layouts (`decoder.checkpoint`) and the GGUF names (`decoder.gguf_checkpoint`). A new parameter
is one `Leaf` here plus its math in `layers.py`.

Shapes are written in the package's dimension letters. A layer leaf is declared for one layer;
the stacked tree adds the leading layer axis L.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from scanlab import sharding
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.params import Attention, DecoderBlock, DecoderParams, outside_layers
from scanlab.errors import ArgumentError, ArgumentTypeError

# Which mesh axis shards each letter: the model width over "data" (FSDP), the key/value heads and
# the MLP width over "model" (tensor parallel). Every other axis is replicated.
MESH_AXIS_OF_LETTER = {"D": sharding.DATA_AXIS, "K": sharding.MODEL_AXIS, "F": sharding.MODEL_AXIS}


class Leaf(NamedTuple):
    """The declaration of one parameter.

    Attributes:
      shape: the config's letters, one per axis, e.g. "D R K Dh" (one layer, no L).
      init: "ones", "zeros", or "normal" with std 1/sqrt(product of the `fan_in` letters).
      fan_in: letters of the fan-in for "normal" ("" for std 1).
      hf_name: the transformers tensor name; layer leaves sit under "model.layers.{i}.".
      hf_layout: the transformers tensor's axes as groups of letters, "(K R Dh) D" meaning a
        2-d tensor whose first axis flattens K, R and Dh in that order.
      gguf_name: the GGUF (llama.cpp) tensor name; layer leaves sit under "blk.{i}.". GGUF
        tensors have the transformers layout, but see `gguf_interleaved`.
      gguf_interleaved: llama.cpp stores the Dh axis of Llama's q and k projections with the
        rotary pairs interleaved (Meta's order) instead of transformers' two halves.
      sharded: False to replicate the leaf whatever its letters (norms: small and read whole).
      present: which configs have the leaf (default: all).
    """

    shape: str
    init: str
    fan_in: str = ""
    hf_name: str = ""
    hf_layout: str = ""
    gguf_name: str = ""
    gguf_interleaved: bool = False
    sharded: bool = True
    present: Callable[[DecoderConfig], bool] = lambda config: True


def _norm(hf_name: str, gguf_name: str) -> Leaf:
    return Leaf("D", "ones", hf_name=hf_name, hf_layout="D", gguf_name=gguf_name, sharded=False)


def _qkv_bias(shape: str, hf_name: str, hf_layout: str, gguf_name: str) -> Leaf:
    return Leaf(
        shape,
        "zeros",
        hf_name=hf_name,
        hf_layout=hf_layout,
        gguf_name=gguf_name,
        present=lambda config: config.qkv_bias,
    )


# Absent when the embedding is tied (the output head reuses it): GGUF files tell by its name.
LM_HEAD = Leaf(
    "D V",
    "normal",
    "D",
    "lm_head.weight",
    "V D",
    "output.weight",
    present=lambda config: not config.tie_embeddings,
)

SPEC = DecoderParams(
    embed=Leaf("V D", "normal", "", "model.embed_tokens.weight", "V D", "token_embd.weight"),
    blocks=DecoderBlock(
        input_norm=_norm("input_layernorm.weight", "attn_norm.weight"),
        attention=Attention(
            q_proj=Leaf(
                "D R K Dh",
                "normal",
                "D",
                "self_attn.q_proj.weight",
                "(K R Dh) D",
                "attn_q.weight",
                gguf_interleaved=True,
            ),
            k_proj=Leaf(
                "D K Dh",
                "normal",
                "D",
                "self_attn.k_proj.weight",
                "(K Dh) D",
                "attn_k.weight",
                gguf_interleaved=True,
            ),
            v_proj=Leaf(
                "D K Dh", "normal", "D", "self_attn.v_proj.weight", "(K Dh) D", "attn_v.weight"
            ),
            out_proj=Leaf(
                "R K Dh D",
                "normal",
                "R K Dh",
                "self_attn.o_proj.weight",
                "D (K R Dh)",
                "attn_output.weight",
            ),
            q_bias=_qkv_bias("R K Dh", "self_attn.q_proj.bias", "(K R Dh)", "attn_q.bias"),
            k_bias=_qkv_bias("K Dh", "self_attn.k_proj.bias", "(K Dh)", "attn_k.bias"),
            v_bias=_qkv_bias("K Dh", "self_attn.v_proj.bias", "(K Dh)", "attn_v.bias"),
        ),
        post_attn_norm=_norm("post_attention_layernorm.weight", "ffn_norm.weight"),
        gate_proj=Leaf("D F", "normal", "D", "mlp.gate_proj.weight", "F D", "ffn_gate.weight"),
        up_proj=Leaf("D F", "normal", "D", "mlp.up_proj.weight", "F D", "ffn_up.weight"),
        down_proj=Leaf("F D", "normal", "F", "mlp.down_proj.weight", "D F", "ffn_down.weight"),
    ),
    final_norm=_norm("model.norm.weight", "output_norm.weight"),
    lm_head=LM_HEAD,
)


def is_leaf(node: Any) -> bool:
    return isinstance(node, Leaf)


# The DecoderConfig field that sizes each dimension letter.
FIELD_OF_LETTER = {
    "V": "vocab_size",
    "L": "n_layers",
    "D": "d_model",
    "R": "n_rep",
    "K": "n_kv_heads",
    "Dh": "head_dim",
    "F": "mlp_dim",
}


def sizes(config: DecoderConfig) -> dict[str, int]:
    """Each dimension letter's size in this config."""
    return {letter: getattr(config, field) for letter, field in FIELD_OF_LETTER.items()}


def declared(config: DecoderConfig) -> DecoderParams:
    """SPEC with the leaves this config does not have replaced by None."""
    return jax.tree.map(lambda leaf: leaf if leaf.present(config) else None, SPEC, is_leaf=is_leaf)


def _map(fn: Callable[[Leaf, bool], Any], config: DecoderConfig) -> DecoderParams:
    """`fn(leaf, in_blocks)` over this config's declared leaves; absent leaves stay None."""
    tree = declared(config)
    outside = jax.tree.map(lambda leaf: fn(leaf, False), outside_layers(tree), is_leaf=is_leaf)
    blocks = jax.tree.map(lambda leaf: fn(leaf, True), tree.blocks, is_leaf=is_leaf)
    return outside._replace(blocks=blocks)


def _shape(letters: str, config: DecoderConfig) -> tuple[int, ...]:
    size = sizes(config)
    return tuple(size[letter] for letter in letters.split())


def layer_shapes(config: DecoderConfig) -> DecoderBlock:
    """The shape of each block leaf for one layer (as the layer scan's body sees it)."""
    return _map(lambda leaf, _: _shape(leaf.shape, config), config).blocks


def param_shapes(config: DecoderConfig) -> DecoderParams:
    """The shape of every leaf, block leaves with the leading layer axis L."""
    return _map(
        lambda leaf, in_blocks: (
            ((config.n_layers,) if in_blocks else ()) + _shape(leaf.shape, config)
        ),
        config,
    )


def is_shape(node: Any) -> bool:
    return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


def _init_tree(declarations, shapes, config: DecoderConfig, key: jax.Array, dtype):
    """Arrays for declared leaves of the given shapes.

    All the normals come from one `jax.random.normal` call split into leaves: XLA compiles the
    random-bit generator once instead of once per leaf shape (seconds on a CPU).
    """
    leaves, treedef = jax.tree.flatten(declarations, is_leaf=is_leaf)
    shape_leaves = treedef.flatten_up_to(shapes)
    size = sizes(config)
    counts = [
        math.prod(shape) if leaf.init == "normal" else 0
        for leaf, shape in zip(leaves, shape_leaves, strict=True)
    ]
    normals = jnp.split(jax.random.normal(key, (sum(counts),), dtype), np.cumsum(counts)[:-1])
    arrays = []
    for leaf, shape, normal in zip(leaves, shape_leaves, normals, strict=True):
        if leaf.init == "normal":
            fan_in = math.prod(size[letter] for letter in leaf.fan_in.split())
            arrays.append((normal * fan_in**-0.5).reshape(shape))
        else:
            arrays.append(jnp.full(shape, 1.0 if leaf.init == "ones" else 0.0, dtype))
    return treedef.unflatten(arrays)


def init_params(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderParams:
    """All parameters, initialised as declared (norms 1, biases 0, weights normal/√fan-in)."""
    return _init_tree(declared(config), param_shapes(config), config, key, dtype)


def init_layer(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderBlock:
    """One layer's parameters (no L axis), initialised as `init_params` initialises a layer."""
    return _init_tree(declared(config).blocks, layer_shapes(config), config, key, dtype)


def init_outside_layers(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderParams:
    """The parameters outside the layer stack (embed, final_norm, lm_head); blocks is None."""
    return _init_tree(
        outside_layers(declared(config)),
        outside_layers(param_shapes(config)),
        config,
        key,
        dtype,
    )


def param_count(config: DecoderConfig) -> int:
    """Number of parameters, from the declared shapes alone (nothing allocated)."""
    return sum(
        math.prod(shape) for shape in jax.tree.leaves(param_shapes(config), is_leaf=is_shape)
    )


def check_params(params: DecoderParams, config: DecoderConfig) -> None:
    """Raises naming the first leaf that is missing, extra or not of the declared shape."""
    if not isinstance(params, DecoderParams):
        raise ArgumentTypeError(f"params must be a DecoderParams, got {type(params).__name__}")
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=is_shape)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, shape in expected:
        name = "params" + jax.tree_util.keystr(path)
        leaf = got.pop(path, None)
        if leaf is None:
            raise ArgumentError(f"{name} is missing: this config declares it with shape {shape}")
        leaf_shape = tuple(np.shape(leaf))
        if leaf_shape == shape:
            continue
        if ".blocks" in name and leaf_shape[:1] != shape[:1]:
            raise ArgumentError(
                f"{name} has {leaf_shape[0] if leaf_shape else 'no'} layers on its leading axis, "
                f"expected n_layers={config.n_layers}: shape {leaf_shape}, expected {shape}"
            )
        raise ArgumentError(f"{name} has shape {leaf_shape}, expected {shape}")
    if got:
        extra = "params" + jax.tree_util.keystr(next(iter(got)))
        raise ArgumentError(f"{extra} is not declared for this config (set to None), got an array")


def param_specs(config: DecoderConfig, mesh: Mesh) -> DecoderParams:
    """A PartitionSpec per leaf from its letters (`MESH_AXIS_OF_LETTER`); the L axis stays whole.

    Raises ValueError when the mesh does not divide an axis it shards.
    """
    size = sizes(config)
    for letter, axis in MESH_AXIS_OF_LETTER.items():
        sharding.check_divisible(FIELD_OF_LETTER[letter], size[letter], mesh, axis)

    def spec(leaf: Leaf, in_blocks: bool) -> PartitionSpec:
        if not leaf.sharded:
            return PartitionSpec()
        axes = [MESH_AXIS_OF_LETTER.get(letter) for letter in leaf.shape.split()]
        return PartitionSpec(*([None] if in_blocks else []), *axes)

    return _map(spec, config)


def shard_params(params: DecoderParams, config: DecoderConfig, mesh: Mesh) -> DecoderParams:
    """Places DecoderParams on the mesh by `param_specs`."""
    return jax.device_put(params, sharding.named(param_specs(config, mesh), mesh))
