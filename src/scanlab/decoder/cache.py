"""KV caches for decoding: full-length for layers that attend every earlier key, window-sized
rings for sliding-window layers, both stacked, all layers in one scan body.

A `Cache` is two stacks: `full` (one slice per full-attention layer, a slot per position) and
`ring` (one slice per sliding layer, W slots, position p in slot p % W). With Gemma 3's five
sliding layers per full one, a long context keeps about a sixth of the full-length bytes.
Each layer's `CacheSlot` (scanned beside its weights) says which stack is its own and where in
it; the layer writes its new keys into both stacks, the write into the other one a no-op (the
slot's old values written back), and attends over its own under `lax.cond`. Neither branch
returns a cache, and each write depends on every read of its stack, so XLA updates both stacks
in place; otherwise it copies them each layer (checked in tests/decoder/test_cache.py).

The ring attends its W slots plus the S new keys (a prefill longer than the window, too), then
keeps the last W; the masks of a step are computed once, outside the layer scan (`step_masks`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import SLIDING
from scanlab.decoder.layers import Attend, LayerKind, attend, within_window


class LayerCache(NamedTuple):
    """Keys and values of a stack of N layers, each with T slots."""

    k: jax.Array  # (N, B, T, K, Dh)
    v: jax.Array  # (N, B, T, K, Dh)


class Cache(NamedTuple):
    full: LayerCache  # (Lf, B, T, K, Dh), T the positions decoded: the full-attention layers
    # (Ls, B, W, K, Dh): the sliding layers' last W positions. None: every layer is in `full`
    # (no sliding layers, a window no shorter than T, or `bounded=False`).
    ring: LayerCache | None


class CacheSlot(NamedTuple):
    """Where a layer's keys live; numpy (L,) arrays, scanned beside the layers' weights."""

    in_ring: np.ndarray  # bool: in the ring stack (else the full one)
    stack_index: np.ndarray  # int32: its slice in that stack


class StepMasks(NamedTuple):
    """What each layer's queries may see in one step, for every layer of it."""

    full_BxSxT: jax.Array  # the full stack's slots: written, not padding, not after the query
    ring_BxSxU: jax.Array | None  # U = W + S: the ring's W slots, then the S new keys


def _stack(n_layers: int, batch: int, slots: int, config: DecoderConfig, dtype) -> LayerCache:
    shape = (n_layers, batch, slots, config.n_kv_heads, config.head_dim)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def init_cache(
    config: DecoderConfig, batch: int, length: int, dtype=jnp.float32, *, bounded: bool = True
) -> Cache:
    """An empty cache for `length` positions; sliding layers in W-slot rings when `bounded`
    and the window W is shorter than `length`."""
    sliding = sum(kind == SLIDING for kind in config.layer_types)
    window = config.sliding_window
    if bounded and window is not None and window < length:
        return Cache(
            full=_stack(config.n_layers - sliding, batch, length, config, dtype),
            ring=_stack(sliding, batch, window, config, dtype),
        )
    return Cache(full=_stack(config.n_layers, batch, length, config, dtype), ring=None)


def cache_slots(config: DecoderConfig, cache: Cache) -> CacheSlot:
    """Each layer's stack and slice in this cache."""
    if cache.ring is None:
        n_layers = config.n_layers
        return CacheSlot(np.zeros(n_layers, bool), np.arange(n_layers, dtype=np.int32))
    ring = np.array([kind == SLIDING for kind in config.layer_types])
    index = np.where(ring, np.cumsum(ring) - 1, np.cumsum(~ring) - 1).astype(np.int32)
    return CacheSlot(ring, index)


def cache_bytes(cache: Cache) -> int:
    """The bytes of a cache's arrays, or of their shapes (`jax.eval_shape`: nothing allocated)."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def step_masks(
    cache: Cache, positions_BxS: jax.Array, filled_BxT: jax.Array, config: DecoderConfig
) -> StepMasks:
    """The masks of a step writing S new tokens at `positions` (consecutive in each row).

    `filled_BxT` is True at every position holding a real token or one still to be decoded
    (False for prompt padding).
    """
    slots_T = jnp.arange(filled_BxT.shape[1])
    full = (slots_T[None, None, :] <= positions_BxS[:, :, None]) & filled_BxT[:, None, :]
    if cache.ring is None:
        return StepMasks(full, None)
    window = cache.ring.k.shape[2]
    # Ring slot j holds the latest position before this step's first that is j modulo W.
    before_B = positions_BxS[:, 0] - 1
    held_BxW = before_B[:, None] - (before_B[:, None] - jnp.arange(window)[None, :]) % window
    keys_BxU = jnp.concatenate([held_BxW, positions_BxS], axis=1)
    real_BxU = (keys_BxU >= 0) & jnp.take_along_axis(filled_BxT, jnp.maximum(keys_BxU, 0), 1)
    causal_BxSxU = keys_BxU[:, None, :] <= positions_BxS[:, :, None]
    ring = within_window(causal_BxSxU & real_BxU[:, None, :], positions_BxS, keys_BxU, window)
    return StepMasks(full, ring)


def _put(stack: LayerCache, index, rows_Bx1, slots_BxS, new: LayerCache, on, old=None):
    """Writes the new keys and values (B, S, K, Dh) into slice `index` at `slots` where `on`;
    else writes back the `old` values there (default: read from the stack)."""
    if old is None:
        old = LayerCache(*(cached[index, rows_Bx1, slots_BxS] for cached in stack))

    def put(cached, new, old):
        return cached.at[index, rows_Bx1, slots_BxS].set(jnp.where(on, new.astype(old.dtype), old))

    return LayerCache(*map(put, stack, new, old))


def cached_attend(
    cache: Cache,
    slot: CacheSlot,
    kind: LayerKind,
    masks: StepMasks,
    positions_BxS: jax.Array,
    config: DecoderConfig,
) -> Attend:
    """The layer's attention over its cache and the new keys, and the cache with them written.

    `slot` holds this layer's two scalars, traced: the layer scan's slice of `cache_slots`.
    """
    rows_Bx1 = jnp.arange(positions_BxS.shape[0])[:, None]
    key_slots_BxT = jnp.broadcast_to(jnp.arange(cache.full.k.shape[2]), masks.full_BxSxT.shape[::2])
    has_full = cache.full.k.shape[0] > 0  # False for a stack of sliding layers only

    def attend_fn(q, k, v):
        in_ring, index = slot
        full, full_index = cache.full, index
        if has_full:
            if cache.ring is not None:
                full_index = jnp.where(in_ring, 0, index)
            full = _put(full, full_index, rows_Bx1, positions_BxS, LayerCache(k, v), ~in_ring)

        def over_full():
            mask = within_window(masks.full_BxSxT, positions_BxS, key_slots_BxT, kind.window)
            return attend(q, full.k[full_index], full.v[full_index], mask, config.query_scale)

        if cache.ring is None:
            return over_full(), Cache(full, None)
        ring_index = jnp.where(in_ring, index, 0)
        # The ring's W slots, then the S new keys and values.
        keys, values = (
            jnp.concatenate([cached[ring_index], new.astype(cached.dtype)], 1)
            for cached, new in zip(cache.ring, (k, v), strict=True)
        )

        def over_ring():
            return attend(q, keys, values, masks.ring_BxSxU, config.query_scale)

        out = jax.lax.cond(in_ring, over_ring, over_full) if has_full else over_ring()
        # The ring keeps the last W new keys (a longer prefill overwrites the rest). The values
        # a sliding layer writes back come from `keys`/`values`, so the write waits for that
        # read: otherwise XLA copies the whole ring stack to keep the old values for it.
        kept = min(positions_BxS.shape[1], config.sliding_window)
        slots_BxS = positions_BxS[:, -kept:] % config.sliding_window
        old = LayerCache(keys[rows_Bx1, slots_BxS], values[rows_Bx1, slots_BxS])
        new = LayerCache(k[:, -kept:], v[:, -kept:])
        ring = _put(cache.ring, ring_index, rows_Bx1, slots_BxS, new, in_ring, old)
        return out, Cache(full, ring)

    return attend_fn
