"""Format-neutral checkpoint I/O: the error every reader raises, tensor checks, the transformers
tensor layout (which GGUF files share) and the stacking of per-layer tensors into DecoderParams.

Every name and layout comes from the parameter declarations in `scanlab.decoder.families`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder import spec
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import Leaf
from scanlab.decoder.params import DecoderParams, outside_layers
from scanlab.decoder.weights import Weight
from scanlab.errors import ScanlabError

# A tensor as a reader hands it over: NumPy (read or dequantized from a file) or a JAX array.
Tensor = np.ndarray | jax.Array


class CheckpointError(ScanlabError, ValueError):
    """A model file or directory scanlab cannot read, and why."""


def checked_tensor(tensor, shape: tuple[int, ...], what: str, shape_source: str):
    """The tensor, if it has the expected shape and, being float, only finite values."""
    if tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{what} has shape {tuple(tensor.shape)}, expected {shape} from {shape_source}"
        )
    # NumPy checks NumPy's tensors (dequantized GGUF data): jnp would copy each to the device and
    # compile a check per shape.
    xp = np if isinstance(tensor, np.ndarray) else jnp
    if jnp.issubdtype(tensor.dtype, jnp.floating) and not xp.isfinite(tensor).all():
        raise CheckpointError(f"{what} holds NaN or Inf values")
    return tensor


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


# --- the transformers layout ------------------------------------------------------------------


def _groups(layout: str) -> list[list[str]]:
    """ "(K R Dh) D" -> [["K", "R", "Dh"], ["D"]]."""
    return [
        inner.split() if inner else [single]
        for inner, single in re.findall(r"\(([^)]*)\)|(\S+)", layout)
    ]


def hf_shape(leaf: Leaf, config: DecoderConfig) -> tuple[int, ...]:
    """The shape transformers stores this leaf with (one layer's slice for block leaves)."""
    size = spec.sizes(config)
    return tuple(math.prod(size[letter] for letter in group) for group in _groups(leaf.hf_layout))


def to_hf(leaf: Leaf, array: Tensor, config: DecoderConfig) -> Tensor:
    """scanlab's layout (leaf.shape) -> transformers' (leaf.hf_layout)."""
    letters = leaf.shape.split()
    hf_letters = [letter for group in _groups(leaf.hf_layout) for letter in group]
    return array.transpose([letters.index(letter) for letter in hf_letters]).reshape(
        hf_shape(leaf, config)
    )


def from_hf(leaf: Leaf, tensor: Tensor, config: DecoderConfig, block: int = 1) -> Tensor:
    """transformers' layout (leaf.hf_layout) -> scanlab's (leaf.shape).

    With `block`, the tensor has one entry per block of `block` inputs (a quantized tensor's
    scales): the input axis is `block` times shorter.
    """
    size = spec.sizes(config)
    size[leaf.input_letter] //= block
    hf_letters = [letter for group in _groups(leaf.hf_layout) for letter in group]
    expanded = tensor.reshape([size[letter] for letter in hf_letters])
    return expanded.transpose([hf_letters.index(letter) for letter in leaf.shape.split()])


# --- stacking ---------------------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, i: jax.Array, layer: jax.Array) -> jax.Array:
    # Donated: the stacked buffer is updated in place rather than copied per layer.
    return stacked.at[i].set(layer.astype(stacked.dtype))


def assemble(
    config: DecoderConfig,
    read: Callable[[Leaf, int | None], Tensor],
    dtype,
    read_kept: Callable[[Leaf, bool], Weight | None] = lambda leaf, in_blocks: None,
) -> DecoderParams:
    """Stacked DecoderParams of `dtype` from a reader of one tensor at a time.

    `read(leaf, i)` returns layer i's tensor of a block leaf and `read(leaf, None)` an outside
    leaf's, in scanlab's layout (`leaf.shape`). Each stacked leaf is filled in place, one layer at
    a time, so loading holds at most one extra layer's tensor. `read_kept(leaf, in_blocks)` may
    return a leaf whole, kept quantized (all its layers); None reads it as above.
    """
    declared = spec.declared(config)

    def read_stacked(leaf: Leaf, shape: tuple[int, ...]) -> Weight:
        kept = read_kept(leaf, True)
        if kept is not None:
            return kept
        stacked = jnp.zeros(shape, dtype)
        for i in range(config.n_layers):
            stacked = _set_layer(stacked, i, read(leaf, i))
        return stacked

    def read_outside(leaf: Leaf) -> Weight:
        kept = read_kept(leaf, False)
        return kept if kept is not None else jnp.asarray(read(leaf, None)).astype(dtype)

    outside = jax.tree.map(read_outside, outside_layers(declared), is_leaf=spec.is_leaf)
    blocks = jax.tree.map(
        read_stacked, declared.blocks, spec.param_shapes(config).blocks, is_leaf=spec.is_leaf
    )
    return outside._replace(blocks=blocks)
