"""A weight with a low-rank update beside it (LoRA): `W x + scaling * B(A(dropout(x)))`.

`Adapted` stands where a weight matrix stands in DecoderParams, a `weights.WeightForm` like any
other: the frozen `base` (dense or any other form) runs as it runs anywhere, and the update is
added. Stacked over the layer axis (`a` (L, inputs..., r), `b` (L, r, outputs...)) it scans
with the block like every other leaf. Making, training and merging adapters is
`scanlab.finetune`'s job; this module holds only what the forward pass needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from scanlab.decoder.weights import WeightForm, as_dense, contract, dot, is_form, placements
from scanlab.errors import ArgumentError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted(WeightForm):
    """A frozen weight and its trainable low-rank update.

    Attributes:
      base: the weight, ([L,] inputs..., outputs...): a dense array or another form.
      a: ([L,] inputs..., r), the down-projection (PEFT's lora_A, transposed).
      b: ([L,] r, outputs...), the up-projection (PEFT's lora_B, transposed); zeros at the start,
        so the adapted model starts equal to the base.
      key: ([L,] 2) uint32 raw PRNG keys for dropout on the update's input, or None (none).
      scaling: alpha / r.
      dropout: the rate of that dropout.
    """

    base: Any  # a weights.Weight
    a: jax.Array
    b: jax.Array
    key: jax.Array | None
    scaling: float = dataclasses.field(metadata={"static": True})
    dropout: float = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.base))

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def rank(self) -> int:
        return int(np.shape(self.a)[-1])

    @property
    def read_in_place(self) -> bool:
        return is_form(self.base) and self.base.read_in_place

    @property
    def differentiable(self) -> bool:
        return not is_form(self.base) or self.base.differentiable

    def project(self, x, x_axes, w_axes):
        return contract(x, self.base, x_axes, w_axes) + low_rank_update(x, self, x_axes)

    def dense(self, dtype=None):
        """The merged weight, W + scaling A B, in float32 (or `dtype`)."""
        base = as_dense(self.base, jnp.float32)
        lead = self.a.ndim + self.b.ndim - 2 - base.ndim  # the stacked layer axis, if any
        a = self.a.reshape(*self.a.shape[:lead], -1, self.rank).astype(jnp.float32)
        b = self.b.reshape(*self.b.shape[:lead], self.rank, -1).astype(jnp.float32)
        merged = base + self.scaling * jnp.matmul(a, b).reshape(base.shape)
        return merged.astype(dtype or jnp.float32)

    def at_layer(self, layer):
        """One layer of a stack whose base is read in place: the update's leaves indexed."""
        return dataclasses.replace(
            self,
            base=self.base.at_layer(layer),
            a=self.a[layer],
            b=self.b[layer],
            key=None if self.key is None else self.key[layer],
        )

    def placements(self, spec: PartitionSpec):
        """The base as it shards; the small update replicated."""
        base = placements(self.base, spec)
        key = None if self.key is None else PartitionSpec()
        # The same tree, specs for leaves: what jax.device_put takes beside it.
        return dataclasses.replace(
            self,
            base=base,
            a=PartitionSpec(),  # type: ignore[arg-type]
            b=PartitionSpec(),  # type: ignore[arg-type]
            key=key,  # type: ignore[arg-type]
        )

    def check(self, name, shape, inputs):
        """a is ([L,] inputs..., r), b ([L,] r, outputs...); the base checked as itself."""
        if is_form(self.base):
            self.base.check(name + ".base", shape, inputs)
        lead = self.b.ndim - 1 - (len(shape) - inputs)
        for part, expected in (
            ("a", (*shape[:inputs], self.rank)),
            ("b", (*shape[: max(lead, 0)], self.rank, *shape[inputs:])),
        ):
            got = tuple(np.shape(getattr(self, part)))
            if got != expected:
                raise ArgumentError(f"{name}.{part} has shape {got}, expected {expected}")


def low_rank_update(x: jax.Array, adapted: Adapted, x_axes: tuple[int, ...]) -> jax.Array:
    """scaling * B(A(dropout(x))), contracting x's `x_axes` with a's leading (input) axes.

    The result has x's other axes, then the weight's output axes: what the base projection
    returns, so the two add.
    """
    if adapted.key is not None and adapted.dropout > 0.0:
        keep = jax.random.bernoulli(
            jax.random.wrap_key_data(adapted.key), 1.0 - adapted.dropout, x.shape
        )
        x = jnp.where(keep, x / (1.0 - adapted.dropout), 0.0).astype(x.dtype)
    a = adapted.a.astype(x.dtype)
    h = dot(x, a, x_axes, tuple(range(len(x_axes))))
    update = dot(h, adapted.b.astype(x.dtype), (h.ndim - 1,), (0,))
    return adapted.scaling * update
