"""The layer stack: one block call for every way of running the L layers.

`run_layers` runs `decoder_block` over the stacked parameters by `jax.lax.scan` (one compiled
block) or, with `loop=True`, by a Python loop (the twin: L copies of the block when traced);
with a KV cache it is the decoding stack, the whole cache riding in the scan's carry. The scan
state is the blog's `(key, seq)`: each layer gets its own subkey (None at inference).

Remat is a named policy (`REMAT`), each mapped onto `jax.checkpoint` by `scanlab.loops`:
"none" keeps every activation for the backward pass, "full" only each layer's input, "dots" the
matmul outputs, and "sqrt" nests the layer scan in √L checkpointed segments. Over layers "full"
is the one to pick (W3 in the benchmark report): "sqrt" pays on long scans with small per-step
inputs (`loops.remat_scan`, W10), but here the per-step inputs are the layers' weights, and the
nested scan holds an extra buffer the size of their gradients.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from scanlab import loops
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.layers import LayerCache, decoder_block
from scanlab.decoder.params import DecoderBlock, stack_layers, unstack_layers
from scanlab.errors import ArgumentError

# remat name -> (scanlab.loops policy for each layer, segments of the layer scan)
REMAT: dict[str, tuple[str, int | Literal["sqrt"]]] = {
    "none": ("none", 1),
    "full": ("full", 1),
    "dots": ("dots", 1),
    "sqrt": ("full", "sqrt"),
}


def split_key_nullable(key: jax.Array | None):
    """`jax.random.split(key)`, passing `None` (no randomness, e.g. inference) through."""
    if key is None:
        return None, None
    key, subkey = jax.random.split(key)
    return key, subkey


def check_remat(remat: str, loop: bool = False) -> tuple[str, int | Literal["sqrt"]]:
    """The (policy, segments) of a remat name; "sqrt" needs a scan to nest."""
    if remat not in REMAT:
        raise ArgumentError(f"remat must be one of {list(REMAT)}, got {remat!r}")
    if loop and remat == "sqrt":
        raise ArgumentError("remat='sqrt' nests the layer scan; the Python-loop twin has none")
    return REMAT[remat]


def run_layers(
    blocks: DecoderBlock,
    seq_BxSxD: jax.Array,
    attn_mask_BxSxT: jax.Array,
    *,
    config: DecoderConfig,
    key: jax.Array | None = None,
    positions_BxS: jax.Array | None = None,
    cache: LayerCache | None = None,
    remat: str = "none",
    loop: bool = False,
) -> tuple[jax.Array, LayerCache | None]:
    """All L layers over the residual stream.

    Args:
      blocks: DecoderBlock, every leaf (L, ...).
      seq_BxSxD: the embedded tokens.
      attn_mask_BxSxT: True where query s may attend key position t.
      config: the static DecoderConfig.
      key: dropout key (split once per layer), or None.
      positions_BxS: rotary positions (default 0..S-1).
      cache: all layers' KV cache, k and v (L, B, T, K, Dh), for decoding.
      remat: a name in `REMAT`.
      loop: run the layers by a Python loop instead of `jax.lax.scan`.

    Returns:
      (seq (B, S, D), the updated cache or None).
    """
    policy, segments = check_remat(remat, loop)

    def layer(state, layer_inputs):
        key, seq = state
        block, layer_cache = layer_inputs
        key, subkey = split_key_nullable(key)
        seq, layer_cache = decoder_block(
            block,
            seq,
            attn_mask_BxSxT,
            subkey,
            config=config,
            positions_BxS=positions_BxS,
            cache=layer_cache,
        )
        return (key, seq), layer_cache

    def cached_layer(state, layer_inputs):
        # The whole cache rides in the carry, layer i's slice updated in place: as a scan input
        # and output XLA copied it whole several times per decoding step.
        key, seq, cache = state
        block, i = layer_inputs
        (key, seq), layer_cache = layer((key, seq), (block, jax.tree.map(lambda c: c[i], cache)))
        cache = jax.tree.map(lambda c, new: c.at[i].set(new), cache, layer_cache)
        return (key, seq, cache), None

    with jax.named_scope("layers"):
        if loop:
            (_, seq_BxSxD), caches = _python_loop(layer, (key, seq_BxSxD), blocks, cache, policy)
        elif cache is not None:
            n_layers = jax.tree.leaves(blocks)[0].shape[0]
            (_, seq_BxSxD, caches), _ = jax.lax.scan(
                cached_layer, (key, seq_BxSxD, cache), (blocks, jnp.arange(n_layers))
            )
        else:
            (_, seq_BxSxD), caches = loops.remat_scan(
                layer, (key, seq_BxSxD), (blocks, cache), policy=policy, segments=segments
            )
    return seq_BxSxD, caches


def _python_loop(layer, state, blocks: DecoderBlock, cache: Any, policy: str):
    """The loop twin: the same `layer` step, once per layer, each under the same policy."""
    step = layer if policy == "none" else jax.checkpoint(layer, policy=loops.REMAT_POLICIES[policy])
    layers = unstack_layers(blocks)
    layer_caches = unstack_layers(cache) if cache is not None else [None] * len(layers)
    new_caches = []
    for block, layer_cache in zip(layers, layer_caches, strict=True):
        state, layer_cache = step(state, (block, layer_cache))
        new_caches.append(layer_cache)
    return state, None if cache is None else stack_layers(new_caches)
