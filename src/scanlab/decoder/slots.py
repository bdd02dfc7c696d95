"""Decoding slots: many requests decoded in one compiled scan, each joining and leaving between
dispatches (continuous batching, as JetStream and llama-server do it).

A `Slots` state holds B rows: a KV cache of T positions each and, per row, its newest token and
position, its token budget, stop ids, sampling settings and PRNG key. `admit` prefills N prompts
of one bucket length P together (left-padded) and writes them into their rows; `decode` runs K
steps of the first n rows in one `lax.scan`, the state donated, so the caches are updated in
place. A free or finished row among them is computed too and its result dropped: the shapes
never change, so each (bucket, N) admission and each n's decoding step compile once.

A row's positions are its cache slots, as in `generate` for a left-padded prompt: the prompt's S
tokens sit at P - S .. P - 1 and the answer follows, so P + max_tokens <= T. Rotary attention
depends only on position differences, so a row decodes as its prompt would alone; at
temperature 0 its tokens are `generate`'s (tested, whatever shares the batch and whenever it
joined), and with the same key its draws are too (each row splits its key as `generate` does).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from scanlab.decoder import sampling as sampling_lib
from scanlab.decoder.cache import Cache, init_cache
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.generation import cached_logits
from scanlab.decoder.sampling import Sampling


class Slots(NamedTuple):
    """B rows of decoding state; every field's first axis is the row (the cache's second)."""

    cache: Cache  # (L, B, T, K, Dh) stacks
    filled_BxT: jax.Array  # bool: positions holding a real token or one still to be decoded
    token_B: jax.Array  # int32: the newest token, not yet in the cache
    position_B: jax.Array  # int32: its position
    done_B: jax.Array  # bool: free, finished or cancelled (its steps are dropped)
    left_B: jax.Array  # int32: tokens the row may still emit
    seen_BxV: jax.Array  # bool: tokens in the row so far (the repetition penalty's set)
    stop_BxM: jax.Array  # int32: the row's stop ids, -1 where unused
    sampling: Sampling  # (B,) fields; temperature 0: greedy
    key_B: jax.Array  # (B,) typed PRNG keys


class Emitted(NamedTuple):
    """What K decoding steps produced, row by row."""

    tokens_BxK: jax.Array  # int32
    live_BxK: jax.Array  # bool: the row emitted that token (it was not done)


def init_slots(
    config: DecoderConfig, rows: int, length: int, max_stops: int, dtype=jnp.float32
) -> Slots:
    """B = `rows` free rows of T = `length` positions, each with room for `max_stops` stop ids."""
    return Slots(
        cache=init_cache(config, rows, length, dtype),
        filled_BxT=jnp.zeros((rows, length), bool),
        token_B=jnp.zeros(rows, jnp.int32),
        position_B=jnp.zeros(rows, jnp.int32),
        done_B=jnp.ones(rows, bool),
        left_B=jnp.zeros(rows, jnp.int32),
        seen_BxV=jnp.zeros((rows, config.vocab_size), bool),
        stop_BxM=jnp.full((rows, max_stops), -1, jnp.int32),
        sampling=Sampling(
            temperature=jnp.zeros(rows, jnp.float32),
            top_k=jnp.full(rows, config.vocab_size, jnp.int32),
            top_p=jnp.ones(rows, jnp.float32),
            min_p=jnp.zeros(rows, jnp.float32),
            repetition_penalty=jnp.ones(rows, jnp.float32),
        ),
        key_B=jax.random.split(jax.random.key(0), rows),
    )


def _row_token(logits_V, seen_V, key, sampling: Sampling):
    """One row's next token with its own settings: `sampling_lib.next_token` on a batch of one
    (greedy when `key` is None)."""
    return sampling_lib.next_token(logits_V[None], seen_V[None], key, sampling)[0]


def next_tokens(logits_BxV, seen_BxV, subkey_B, sampling: Sampling) -> jax.Array:
    """(B,) int32: each row's token, greedy where its temperature is 0, else drawn with its key.

    The sampling transforms sort each row: a batch of greedy rows skips them."""
    greedy_B = sampling.temperature <= 0

    def greedy():
        return jax.vmap(_row_token, (0, 0, None, 0))(logits_BxV, seen_BxV, None, sampling)

    def mixed():
        # A greedy row's draw is dropped; temperature 1 keeps its arithmetic finite.
        finite = sampling._replace(temperature=jnp.where(greedy_B, 1.0, sampling.temperature))
        drawn_B = jax.vmap(_row_token)(logits_BxV, seen_BxV, subkey_B, finite)
        return jnp.where(greedy_B, greedy(), drawn_B)

    return jax.lax.cond(jnp.all(greedy_B), greedy, mixed)


def _split(key_B):
    """Each row's key split as `generate` splits its one: (the next keys, this step's subkeys)."""
    pairs_Bx2 = jax.vmap(jax.random.split)(key_B)
    return pairs_Bx2[:, 0], pairs_Bx2[:, 1]


def _row_wise(function, *states: Slots) -> Slots:
    """`function(axis)(*arrays)` for each array of the states, field by field, `axis` the one
    that indexes rows (the caches' second, every other field's first)."""
    return Slots(
        **{
            name: jax.tree.map(function(1 if name == "cache" else 0), *fields)
            for name, *fields in zip(Slots._fields, *states, strict=True)
        }
    )


def _first_rows(slots: Slots, count: int) -> Slots:
    """The first `count` rows of the slots."""
    return _row_wise(lambda axis: lambda a: jax.lax.slice_in_dim(a, 0, count, axis=axis), slots)


def _put_first_rows(slots: Slots, rows: Slots) -> Slots:
    """`slots` with its first rows replaced by `rows`."""
    return _row_wise(
        lambda axis: lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new, 0, axis),
        slots,
        rows,
    )


def _scatter_rows(slots: Slots, rows_N, new: Slots) -> Slots:
    """`slots` with rows `rows_N` replaced by `new`'s N rows in order; rows >= B are dropped."""

    def put(axis: int):
        return lambda old, rows: old.at[(slice(None),) * axis + (rows_N,)].set(rows, mode="drop")

    return _row_wise(put, slots, new)


@functools.partial(jax.jit, static_argnames="config", donate_argnums=1)
def admit(
    params,
    slots: Slots,
    prompts_NxP,
    masks_NxP,
    rows_N,
    max_tokens_N,
    stops_NxM,
    sampling: Sampling,
    keys_N,
    *,
    config: DecoderConfig,
):
    """Slots with N prompts prefilled together into rows `rows_N` and their first tokens drawn;
    and those (N,) tokens.

    prompts_NxP / masks_NxP: the prompts left-padded to one bucket and their masks (False on
    padding); rows_N: int32 rows, distinct, a row >= B dropped (a batch padded to a size
    compiled before); max_tokens_N: budgets, >= 1, P + max_tokens <= T; stops_NxM: stop ids,
    -1 unused; sampling: (N,) fields; keys_N: typed PRNG keys.
    """
    batch, prompt_length = prompts_NxP.shape
    length = slots.filled_BxT.shape[1]
    cache = init_cache(config, batch, length, slots.cache.full.k.dtype)
    filled_NxT = jnp.concatenate([masks_NxP, jnp.ones((batch, length - prompt_length), bool)], 1)
    positions_NxP = jnp.broadcast_to(jnp.arange(prompt_length), (batch, prompt_length))
    logits_NxV, cache = cached_logits(params, config, cache, prompts_NxP, positions_NxP, filled_NxT)
    rows_Nx1 = jnp.arange(batch)[:, None]
    seen_NxV = jnp.zeros((batch, config.vocab_size), bool).at[rows_Nx1, prompts_NxP].max(masks_NxP)
    keys_N, subkeys_N = _split(keys_N)
    tokens_N = next_tokens(logits_NxV, seen_NxV, subkeys_N, sampling)
    admitted = Slots(
        cache=cache,
        filled_BxT=filled_NxT,
        token_B=tokens_N,
        position_B=jnp.full(batch, prompt_length, jnp.int32),
        done_B=(tokens_N[:, None] == stops_NxM).any(1) | (max_tokens_N <= 1),
        left_B=(max_tokens_N - 1).astype(jnp.int32),
        seen_BxV=seen_NxV.at[rows_Nx1[:, 0], tokens_N].set(True),
        stop_BxM=stops_NxM,
        sampling=sampling,
        key_B=keys_N,
    )
    return _scatter_rows(slots, rows_N, admitted), tokens_N


@functools.partial(jax.jit, static_argnames=("config", "steps", "rows"), donate_argnums=1)
def decode(params, slots: Slots, keep_B, pad_id, *, config: DecoderConfig, steps: int, rows: int):
    """`steps` decoding steps of the first `rows` rows in one scan: (the slots after them, what
    those rows emitted). The others are left as they are: the host keeps its busy rows first
    and rounds their count up to a few sizes, so a lone request is not charged for idle rows.

    keep_B: bool (rows,), False for rows the host cancels now (they emit nothing more).
    pad_id: () int32, emitted by rows that are done.
    """
    active = _first_rows(slots, rows)
    active = active._replace(done_B=active.done_B | ~keep_B)
    rows_B = jnp.arange(rows)

    def step(active: Slots, _):
        logits_BxV, cache = cached_logits(
            params,
            config,
            active.cache,
            active.token_B[:, None],
            active.position_B[:, None],
            active.filled_BxT,
        )
        key_B, subkey_B = _split(active.key_B)
        live_B = ~active.done_B
        token_B = jnp.where(
            live_B, next_tokens(logits_BxV, active.seen_BxV, subkey_B, active.sampling), pad_id
        )
        stopped_B = (token_B[:, None] == active.stop_BxM).any(1)
        step_B = live_B.astype(jnp.int32)
        left_B = active.left_B - step_B
        new = active._replace(
            cache=cache,
            token_B=jnp.where(live_B, token_B, active.token_B),
            position_B=active.position_B + step_B,
            done_B=active.done_B | stopped_B | (left_B <= 0),
            left_B=left_B,
            seen_BxV=active.seen_BxV.at[rows_B, token_B].max(live_B),
            key_B=key_B,
        )
        return new, Emitted(token_B, live_B)

    active, emitted = jax.lax.scan(step, active, length=steps)
    return _put_first_rows(slots, active), Emitted(emitted.tokens_BxK.T, emitted.live_BxK.T)
