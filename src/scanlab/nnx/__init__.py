"""scanlab in Flax NNX, the API Flax now recommends: the recurrence and the decoder's layer stack.

`scanlab.nnx.recurrence` holds the seed's recurrence as an `nnx.Module` (a raw `jax.lax.scan`
closing over an `nnx.Param`) and its `nnx.scan` twin, with conversions to and from the linen
variables of `scanlab.recurrence`; `scanlab.nnx.stack` builds the decoder's layers with
`nnx.split_rngs` + `nnx.vmap` and applies them with `nnx.scan` or with split → `jax.lax.scan` →
merge, on the same weights as `scanlab.decoder`.
"""

from scanlab.nnx.recurrence import (
    NNXLaxScanModule,
    NNXScanModule,
    from_linen,
    nnx_lax_scan_in_module,
    to_linen,
)
from scanlab.nnx.stack import NNXDecoder

__all__ = [
    "NNXDecoder",
    "NNXLaxScanModule",
    "NNXScanModule",
    "from_linen",
    "nnx_lax_scan_in_module",
    "to_linen",
]
