"""scanlab: loops the JAX way, with `jax.lax.scan`.

Dimension letters used in every docstring: B batch, T time, L layers, S sequence, D model width,
H hidden, K key/value heads, R query heads per key/value head, Dh head width, F MLP width, V vocab.
"""

from scanlab.recurrence import LaxScanModule, NNScanModule, lax_scan_in_module

__all__ = ["LaxScanModule", "NNScanModule", "lax_scan_in_module"]
