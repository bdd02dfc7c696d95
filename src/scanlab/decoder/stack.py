"""The layer stack: one block call for every way of running the L layers.

`run_layers` runs `decoder_block` over the stacked parameters by `jax.lax.scan` (one compiled
block) or, with `loop=True`, by a Python loop (the twin: L copies of the block when traced);
`run_cached_layers` is the decoding stack, the whole KV cache riding in the scan's carry. Layers
that differ (Gemma 3's sliding and full ones) stay one scan body: each layer's `LayerKind`
(window, rotary base) and `CacheSlot` are scanned beside its weights. The scan state is the
blog's `(key, seq)`: each layer gets its own subkey (None at inference).

Remat is a named policy (`REMAT`), each mapped onto `jax.checkpoint` by `scanlab.loops`:
"none" keeps every activation for the backward pass, "full" only each layer's input, "dots" the
matmul outputs, and "sqrt" nests the layer scan in √L checkpointed segments. Over layers "full"
is the one to pick (W3 in the benchmark report): "sqrt" pays on long scans with small per-step
inputs (`loops.remat_scan`, W10), but here the per-step inputs are the layers' weights, and the
nested scan holds an extra buffer the size of their gradients.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from scanlab import loops
from scanlab.decoder import weights
from scanlab.decoder.cache import Cache, StepMasks, cache_slots, cached_attend
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.layers import LayerKind, decoder_block, layer_kinds, self_attend
from scanlab.decoder.params import DecoderBlock, unstack_layers
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


def _layer_step(config: DecoderConfig, positions_BxS: jax.Array, attend_of, held=None):
    """The scan body over ((key, seq), ((block, layer), kind, extra)): `attend_of(kind, extra)`
    is the layer's `Attend`, `held` the stacked weights the scan does not slice
    (`weights.hold_stacked`); the body returns what it updated."""

    def step(state, layer_inputs):
        key, seq = state
        (scanned, layer), kind, extra = layer_inputs
        block = weights.at_layer(scanned, held, layer)
        key, subkey = split_key_nullable(key)
        seq, aux = decoder_block(
            block,
            seq,
            attend_of(kind, extra),
            subkey,
            config=config,
            positions_BxS=positions_BxS,
            kind=kind,
        )
        return (key, seq), aux

    return step


def _default_positions(seq_BxSxD: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(seq_BxSxD.shape[1]), seq_BxSxD.shape[:2])


def run_layers(
    blocks: DecoderBlock,
    seq_BxSxD: jax.Array,
    attn_mask_BxSxS: jax.Array,
    *,
    config: DecoderConfig,
    key: jax.Array | None = None,
    positions_BxS: jax.Array | None = None,
    remat: str = "none",
    loop: bool = False,
) -> jax.Array:
    """All L layers over the residual stream, each token attending the sequence itself.

    Args:
      blocks: DecoderBlock, every leaf (L, ...).
      seq_BxSxD: the embedded tokens.
      attn_mask_BxSxS: True where query s may attend key s' (causal and padding); sliding
        layers also limit it to their window.
      config: the static DecoderConfig.
      key: dropout key (split once per layer), or None.
      positions_BxS: rotary positions (default 0..S-1).
      remat: a name in `REMAT`.
      loop: run the layers by a Python loop instead of `jax.lax.scan`.

    Returns:
      seq (B, S, D).
    """
    policy, segments = check_remat(remat, loop)
    if positions_BxS is None:
        positions_BxS = _default_positions(seq_BxSxD)
    scanned, held = weights.hold_stacked(blocks)
    step = _layer_step(
        config,
        positions_BxS,
        lambda kind, _: self_attend(attn_mask_BxSxS, positions_BxS, kind, config),
        held,
    )
    kinds = layer_kinds(config)
    with jax.named_scope("layers"):
        if loop:
            (_, seq_BxSxD), _ = _python_loop(step, (key, seq_BxSxD), scanned, kinds, policy)
        else:
            layers = (scanned, jnp.arange(config.n_layers, dtype=jnp.int32))
            (_, seq_BxSxD), _ = loops.remat_scan(
                step, (key, seq_BxSxD), (layers, kinds, None), policy=policy, segments=segments
            )
    return seq_BxSxD


def run_cached_layers(
    blocks: DecoderBlock,
    seq_BxSxD: jax.Array,
    cache: Cache,
    masks: StepMasks,
    positions_BxS: jax.Array,
    *,
    config: DecoderConfig,
) -> tuple[jax.Array, Cache]:
    """All L layers over S new tokens, attending and updating the KV cache (decoding).

    Args:
      blocks: DecoderBlock, every leaf (L, ...).
      seq_BxSxD: the embedded new tokens.
      cache: every layer's keys and values (`scanlab.decoder.cache`).
      masks: the step's masks (`cache.step_masks`).
      positions_BxS: the new tokens' positions (their cache slots).
      config: the static DecoderConfig.

    Returns:
      (seq (B, S, D), the cache with the new keys and values written).
    """
    slots = cache_slots(config, cache)

    def attend_of(kind, layer_inputs):
        cache, slot = layer_inputs
        return cached_attend(cache, slot, kind, masks, positions_BxS, config)

    scanned, held = weights.hold_stacked(blocks)
    step = _layer_step(config, positions_BxS, attend_of, held)

    def cached_step(state, layer_inputs):
        # The whole cache rides in the carry, updated in place: as a scan input and output XLA
        # copied it whole several times per decoding step.
        key, seq, cache = state
        block, kind, slot = layer_inputs
        (key, seq), cache = step((key, seq), (block, kind, (cache, slot)))
        return (key, seq, cache), None

    with jax.named_scope("layers"):
        (_, seq_BxSxD, cache), _ = jax.lax.scan(
            cached_step,
            (None, seq_BxSxD, cache),
            (
                (scanned, jnp.arange(config.n_layers, dtype=jnp.int32)),
                layer_kinds(config),
                jax.tree.map(jnp.asarray, slots),
            ),
        )
    return seq_BxSxD, cache


def _python_loop(step, state, blocks: DecoderBlock, kinds: LayerKind, policy: str):
    """The loop twin: the same `step`, once per layer, each under the same policy."""
    if policy != "none":
        step = jax.checkpoint(step, policy=loops.REMAT_POLICIES[policy])
    for i, block in enumerate(unstack_layers(blocks)):
        kind = LayerKind(*(leaf[i] for leaf in kinds))
        state, _ = step(state, ((block, jnp.int32(i)), kind, None))
    return state, None
