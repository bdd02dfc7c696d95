"""A weight with a low-rank update beside it (LoRA): `W x + scaling * B(A(dropout(x)))`.

`Adapted` stands where a weight matrix stands in DecoderParams; `quant.project`, the seam every
projection goes through, runs the frozen `base` (dense or kept quantized) as it runs any weight,
and adds the update. Stacked over the layer axis (`a` (L, inputs..., r), `b` (L, r, outputs...))
it scans with the block like every other leaf. Making, training and merging adapters is
`scanlab.finetune`'s job; this module holds only what the forward pass needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen weight and its trainable low-rank update.

    Attributes:
      base: the weight, ([L,] inputs..., outputs...): a dense array or a quantized one.
      a: ([L,] inputs..., r), the down-projection (PEFT's lora_A, transposed).
      b: ([L,] r, outputs...), the up-projection (PEFT's lora_B, transposed); zeros at the start,
        so the adapted model starts equal to the base.
      key: ([L,] 2) uint32 raw PRNG keys for dropout on the update's input, or None (none).
      scaling: alpha / r.
      dropout: the rate of that dropout.
    """

    base: Any  # a quant.Weight (dense, QuantArray, PackedArray)
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
    h = jax.lax.dot_general(x, a, ((x_axes, tuple(range(len(x_axes)))), ((), ())))
    update = jax.lax.dot_general(h, adapted.b.astype(x.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return adapted.scaling * update
