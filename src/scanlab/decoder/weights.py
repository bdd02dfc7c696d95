"""The weight forms, and the one seam every weight use goes through.

A weight matrix in DecoderParams is a dense array or a *form*: int8 blocks (`quant.QuantArray`),
a quantized vocabulary matrix in column chunks (`quant.VocabChunks`), the CPU kernel's packed
layout (`qmatvec.PackedArray`), or a frozen weight with a low-rank update (`lora.Adapted`).
Each form is one pytree class implementing `WeightForm`: how activations meet it (`project`),
its dense array (`dense`), its bytes (`nbytes`), its placement on a mesh (`placements`) and
the checks of its leaves (`check`). The functions below take a dense array as itself and ask
a form to do the rest, so no code outside a form's class asks which form a weight is; a new form
(a GPU layout, adapters per request) is one class.
"""

from __future__ import annotations

import abc
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


class WeightForm(abc.ABC):
    """A weight matrix held in another form than a dense array (a registered pytree).

    Its logical shape is the dense matrix's, ([L,] inputs..., outputs...).
    """

    @property
    def read_in_place(self) -> bool:
        """The layer scan hands such a weight whole, with its layer index (`at_layer`), rather
        than a sliced copy: the kernel reads the stacked layers in place."""
        return False

    @property
    def differentiable(self) -> bool:
        """Whether gradients flow through `project`."""
        return True

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The dense matrix's shape."""

    @property
    @abc.abstractmethod
    def dtype(self) -> Any:
        """The dtype it computes in."""

    @abc.abstractmethod
    def project(self, x: jax.Array, x_axes: tuple[int, ...], w_axes: tuple[int, ...]):
        """x contracted with the weight, x's `x_axes` against its `w_axes` (in stored order):
        x's other axes, then the weight's."""

    @abc.abstractmethod
    def dense(self, dtype=None) -> jax.Array:
        """The dense matrix (in `dtype`, default the form's compute dtype)."""

    @abc.abstractmethod
    def placements(self, spec: PartitionSpec) -> Any:
        """A PartitionSpec per leaf of this form, given its dense twin's `spec`; raises
        ArgumentTypeError where the form cannot be sharded."""

    @abc.abstractmethod
    def check(self, name: str, shape: tuple[int, ...], inputs: int) -> None:
        """Raises naming `name` unless the leaves are consistent with the dense `shape`, whose
        first `inputs` axes (the layer axis counted) precede the outputs."""

    def rows(self, tokens: jax.Array) -> jax.Array:
        """The rows of a (V, D) embedding for token ids (...,) -> (..., D)."""
        return self.dense()[tokens]

    def as_head(self) -> WeightForm | jax.Array:
        """A (V, D) embedding as the (D, V) output head of a tied model."""
        return self.dense().T

    def at_layer(self, layer: jax.Array) -> WeightForm:
        """One layer of a stacked weight read in place (`read_in_place` forms)."""
        raise NotImplementedError(f"{type(self).__name__} is not read in place")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes its arrays hold."""
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))


def is_form(node: Any) -> bool:
    return isinstance(node, WeightForm)


Weight = jax.Array | WeightForm


def dot(x: jax.Array, dense: jax.Array, x_axes: tuple[int, ...], w_axes: tuple[int, ...]):
    """x's `x_axes` contracted with a dense weight's `w_axes`."""
    return jax.lax.dot_general(x, dense, ((x_axes, w_axes), ((), ())))


def project(equation: str, x: jax.Array, weight: Weight) -> jax.Array:
    """`jnp.einsum(equation, x, weight)` for a weight of any form.

    The equation's output must be x's kept axes, then the weight's. The contraction runs over
    the weight's axes in their stored order: `jnp.einsum` may list them in another, and XLA then
    copies the weight transposed before its dot, every layer of every step.
    """
    return contract(x, weight, *contraction(equation))


def contract(x: jax.Array, weight: Weight, x_axes: tuple[int, ...], w_axes: tuple[int, ...]):
    """x's `x_axes` contracted with the weight's `w_axes`, whatever its form."""
    if isinstance(weight, WeightForm):
        return weight.project(x, x_axes, w_axes)
    return dot(x, weight, x_axes, w_axes)


def placements(weight: Weight, spec: PartitionSpec):
    """The weight's PartitionSpec tree, given its dense twin's `spec` (a dense array: `spec`)."""
    return weight.placements(spec) if isinstance(weight, WeightForm) else spec


@functools.cache
def contraction(equation: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """ "bsrkh,rkhd->bsd" -> ((2, 3, 4), (0, 1, 2)): the contracted axes of x and of the weight."""
    inputs, out = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    contracted = [axis for axis in w_axes if axis in x_axes and axis not in out]
    kept = [axis for axis in x_axes if axis not in contracted]
    kept += [axis for axis in w_axes if axis not in contracted]
    if "".join(kept) != out:
        raise ValueError(f"{equation}: the output must be x's kept axes, then the weight's")
    return tuple(x_axes.index(a) for a in contracted), tuple(w_axes.index(a) for a in contracted)


def as_dense(weight: Weight, dtype=None) -> jax.Array:
    """The weight as a dense array (in `dtype`, or as it is / its compute dtype)."""
    if isinstance(weight, WeightForm):
        return weight.dense(dtype)
    return weight if dtype is None else weight.astype(dtype)


def embed_rows(embedding: Weight, tokens: jax.Array) -> jax.Array:
    """The (V, D) embedding's rows for token ids (...,) -> (..., D)."""
    if isinstance(embedding, WeightForm):
        return embedding.rows(tokens)
    return embedding[tokens]


def tied_head(embedding: Weight) -> Weight:
    """The (D, V) output head of a tied (V, D) embedding."""
    return embedding.as_head() if isinstance(embedding, WeightForm) else embedding.T


def head_logits(x_BxSxD: jax.Array, head: Weight) -> jax.Array:
    """x @ head (D, V), accumulated in f32: (B, S, D) -> (B, S, V)."""
    if isinstance(head, WeightForm):
        return head.project(x_BxSxD, (2,), (0,)).astype(jnp.float32)
    return jnp.matmul(x_BxSxD, head, preferred_element_type=jnp.float32)


def hold_stacked(blocks):
    """(blocks without their read-in-place forms, those forms alone): the layer scan slices the
    first and gives the second whole to `at_layer`, so the kernel reads each layer in place."""
    held = jax.tree.map(lambda w: w if _read_in_place(w) else None, blocks, is_leaf=is_form)
    scanned = jax.tree.map(lambda w: None if _read_in_place(w) else w, blocks, is_leaf=is_form)
    return scanned, held


def _read_in_place(node) -> bool:
    return is_form(node) and node.read_in_place


def at_layer(scanned, held, layer: jax.Array):
    """One layer's block: its scanned slice, with the held forms pointed at `layer`."""
    if held is None:
        return scanned
    return jax.tree.map(
        lambda hold, part: part if hold is None else hold.at_layer(layer),
        held,
        scanned,
        is_leaf=lambda node: node is None or _read_in_place(node),
    )
