"""Everything about the parameters, derived from their declarations.

Each family's `Leaf` declarations (`scanlab.decoder.families`) give the shapes
(`param_shapes`, the `eval_shape` listing), initialisation (`init_params`), validation
(`check_params`) and placement on a mesh (`param_specs`); the formats read the checkpoint names
and layouts from the same declarations. A new parameter is one `Leaf` in its family, a field
of its container in `params.py`, and its math in `layers.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from scanlab import checks, sharding
from scanlab.decoder import quant, weights
from scanlab.decoder.config import DecoderConfig, check_config
from scanlab.decoder.families import Leaf
from scanlab.decoder.params import DecoderBlock, DecoderParams, outside_layers
from scanlab.errors import ArgumentError, ArgumentTypeError

# Which mesh axis shards each letter: the model width over "data" (FSDP), the key/value heads and
# the MLP width over "model" (tensor parallel). Every other axis is replicated.
MESH_AXIS_OF_LETTER = {"D": sharding.DATA_AXIS, "K": sharding.MODEL_AXIS, "F": sharding.MODEL_AXIS}


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
    """The family's declarations, the leaves this config does not have replaced by None."""
    return jax.tree.map(
        lambda leaf: leaf if leaf.present(config) else None,
        config.features.leaves,
        is_leaf=is_leaf,
    )


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


def check_param_dtype(dtype) -> np.dtype:
    """A floating dtype for parameters: an integer one would truncate the weights."""
    try:
        checked = jnp.dtype(dtype)
    except TypeError:
        raise ArgumentTypeError(f"dtype must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(checked, jnp.floating):
        raise ArgumentTypeError(f"dtype must be a floating dtype, got {checked.name}")
    return checked


def init_params(config: DecoderConfig, key: jax.Array, dtype=jnp.float32) -> DecoderParams:
    """All parameters, initialised as declared (norms 1, biases 0, weights normal/√fan-in)."""
    check_config(config, ("key", key), order="config, key (as in init_params)")
    checks.prng_key("key", key)
    dtype = check_param_dtype(dtype)
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
    """Raises naming the first leaf that is missing, extra or not of the declared shape, or of
    another form than a dense array where the declaration does not allow it (or whose leaves the
    form's own check refuses: scales not one per block, adapters of the wrong rank...)."""
    if not isinstance(params, DecoderParams):
        raise ArgumentTypeError(f"params must be a DecoderParams, got {type(params).__name__}")
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=is_shape)[0]
    leaves = dict(jax.tree_util.tree_flatten_with_path(declared(config), is_leaf=is_leaf)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_form)[0])
    for path, shape in expected:
        name = "params" + jax.tree_util.keystr(path)
        leaf = got.pop(path, None)
        if leaf is None:
            raise ArgumentError(f"{name} is missing: this config declares it with shape {shape}")
        leaf_shape = tuple(np.shape(leaf))
        if leaf_shape != shape:
            if ".blocks" in name and leaf_shape[:1] != shape[:1]:
                raise ArgumentError(
                    f"{name} has {leaf_shape[0] if leaf_shape else 'no'} layers on its leading "
                    f"axis, expected n_layers={config.n_layers}: shape {leaf_shape}, expected "
                    f"{shape}"
                )
            raise ArgumentError(f"{name} has shape {leaf_shape}, expected {shape}")
        if weights.is_form(leaf):
            _check_form(leaf, leaves[path], name, shape)
    if got:
        extra = "params" + jax.tree_util.keystr(next(iter(got)))
        raise ArgumentError(f"{extra} is not declared for this config (set to None), got an array")


def _check_form(form: weights.WeightForm, leaf: Leaf, name: str, shape: tuple[int, ...]) -> None:
    if not leaf.quantizable:
        raise ArgumentTypeError(
            f"{name} is a {type(form).__name__}, but only weight matrices may be; expected a "
            "dense array"
        )
    stacked = len(shape) - len(leaf.shape.split())
    form.check(name, shape, stacked + len(leaf.fan_in.split()))


def check_dense(params: DecoderParams, what: str) -> None:
    """Raises naming the first leaf of another form than a dense array: `what` takes dense
    weights only."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_form)[0]:
        if weights.is_form(leaf):
            raise ArgumentTypeError(
                f"{what} takes dense weights, got params{jax.tree_util.keystr(path)} as a "
                f"{type(leaf).__name__}: load with weights='float32' (or dequantize it)"
            )


def quantize(
    params: DecoderParams, config: DecoderConfig, block: int = 32, *, kernel: bool = False
) -> DecoderParams:
    """Weight-only int8 quantization of every dense weight matrix, blocked along its input axis.

    Each block of `block` inputs gets Q8_0's symmetric int8 values and float16 scale
    (`quant.quantize_blocks`); the output head becomes `VocabChunks`. Norms and biases stay
    dense; leaves already quantized are kept. `kernel`: lay them out for the CPU kernel
    (`quant.decoding_layout`).
    """
    check_params(params, config)
    size = sizes(config)
    for leaf in jax.tree.leaves(declared(config), is_leaf=is_leaf):  # before any work
        if leaf.quantizable and size[leaf.input_letter] % block:
            raise ArgumentError(
                f"block size {block} does not divide the input width "
                f"{FIELD_OF_LETTER[leaf.input_letter]}={size[leaf.input_letter]} of the weights "
                f"blocked along it"
            )

    def quantized(leaf: Leaf, array):
        if array is None or not leaf.quantizable or weights.is_form(array):
            return array
        return quant.quantize_blocks(array, leaf.blocked_axis, block)

    tree = jax.tree.map(
        quantized, declared(config), params, is_leaf=lambda node: node is None or is_leaf(node)
    )
    return quant.decoding_layout(tree, kernel)


def param_bytes(params: DecoderParams) -> int:
    """Bytes the parameters hold, every form's own count (integers, scales, mins...)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params, is_leaf=weights.is_form))


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
    """Places DecoderParams on the mesh by `param_specs`, each form of weight as its class
    places it (`WeightForm.placements`: a quantized leaf's values as its dense twin, its scales
    replicated along the blocked axis; adapters' updates replicated); a form that cannot shard
    (the kernel's layout) is refused by name."""
    specs = param_specs(config, mesh)

    placements = jax.tree.map(
        lambda spec, weight: weights.placements(weight, spec),
        specs,
        params,
        is_leaf=lambda node: node is None or isinstance(node, PartitionSpec),
    )
    return jax.device_put(params, sharding.named(placements, mesh))
