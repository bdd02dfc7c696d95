"""Generation with a KV cache: prefill, then a loop over tokens with the layer scan inside.

Each row stops at its first stop token (a done flag in the loop's carry; a finished row emits
padding), and the loop ends as soon as every row is done. `generate` is one compiled program: a
`lax.while_loop` over tokens whose condition is "tokens left and a row not done". `stream` yields
tokens as they are produced: chunks of `chunk` tokens, each one compiled `lax.scan` of the same
decoding step, with the same early end between chunks. On SmolLM2 (W7 in the benchmark
report) the one while_loop decodes faster than chunked scans, so `generate` keeps it (a program
callable under `jit`).
Sampling settings are traced values (see `scanlab.decoder.sampling`): a new temperature, top-k,
top-p, min-p or repetition penalty reuses the compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder import sampling as sampling_lib
from scanlab.decoder.cache import Cache, init_cache, step_masks
from scanlab.decoder.config import DecoderConfig, check_config
from scanlab.decoder.model import check_mask, check_tokens, embed, unembed
from scanlab.decoder.params import DecoderParams
from scanlab.decoder.sampling import Sampling
from scanlab.decoder.spec import check_params
from scanlab.decoder.stack import run_cached_layers, split_key_nullable
from scanlab.errors import ArgumentError, ArgumentTypeError


class Generation(NamedTuple):
    tokens: jax.Array  # (B, S + N) int32: the prompt, then N new tokens (padding after a stop)
    lengths: jax.Array  # (B,) int32: new tokens of each row, its stop token included
    logits: jax.Array | None  # (B, N, V) f32 with return_logits: what each token came from


class _Prompt(NamedTuple):
    """What every decoding step reads and never changes."""

    filled_BxT: jax.Array  # bool: cache slots holding a real token or to be filled
    length: int  # S, the prompt's slots
    stop_ids: jax.Array  # (n,) int32
    pad_id: jax.Array  # () int32


class _State(NamedTuple):
    """The decoding loop's carry."""

    step: jax.Array  # () int32: new tokens produced so far
    cache: Cache
    token_B: jax.Array  # int32: each row's newest token
    done_B: jax.Array  # bool: the row has produced a stop token
    lengths_B: jax.Array  # int32: new tokens of each row, its stop token included
    seen_BxV: jax.Array  # bool: tokens in the row so far (the repetition penalty's set)
    key: jax.Array | None


def cached_logits(params, config, cache: Cache, tokens_BxS, positions_BxS, filled_BxT):
    """Logits (B, V) of the last of S new tokens at `positions`, and the cache with them written.

    `filled_BxT` is True at every cache slot holding a real token or one still to be decoded.
    """
    seq, cache = run_cached_layers(
        params.blocks,
        embed(params, tokens_BxS, config),
        cache,
        step_masks(cache, positions_BxS, filled_BxT, config),
        positions_BxS,
        config=config,
    )
    return unembed(params, seq[:, -1:], config)[:, 0], cache


def _emit(state: _State, logits_BxV, prompt: _Prompt, sampling: Sampling, max_new_tokens: int):
    """The state after drawing each row's next token from its logits."""
    key, subkey = split_key_nullable(state.key)
    token_B = sampling_lib.next_token(logits_BxV, state.seen_BxV, subkey, sampling)
    finished_B = state.done_B | (state.step >= max_new_tokens)
    token_B = jnp.where(finished_B, prompt.pad_id, token_B)
    rows_B = jnp.arange(token_B.shape[0])
    return _State(
        step=state.step + 1,
        cache=state.cache,
        token_B=token_B,
        done_B=finished_B | jnp.isin(token_B, prompt.stop_ids),
        lengths_B=state.lengths_B + (~finished_B).astype(jnp.int32),
        seen_BxV=state.seen_BxV.at[rows_B, token_B].set(True),
        key=key,
    )


class _Checked(NamedTuple):
    prompt_BxS: jax.Array
    prompt_mask_BxS: jax.Array
    key: jax.Array | None
    sampling: Sampling
    stop_ids: jax.Array
    pad_id: jax.Array


def _prefill(checked: _Checked, params, *, config, max_new_tokens, ring_cache):
    """The prompt through the layers and the first token drawn: (state, its logits, prompt)."""
    prompt_BxS, prompt_mask_BxS, key, sampling, stop_ids, pad_id = checked
    prompt = _prompt(prompt_mask_BxS, stop_ids, pad_id, max_new_tokens)
    batch, length = prompt_BxS.shape
    cache = init_cache(
        config, batch, length + max_new_tokens, params.embed.dtype, bounded=ring_cache
    )
    # Rotary positions are the slots: a left-padded row is shifted as a whole, and attention
    # scores depend only on position differences, so it decodes as it would unpadded.
    positions_BxS = jnp.broadcast_to(jnp.arange(length), (batch, length))
    logits_BxV, cache = cached_logits(
        params, config, cache, prompt_BxS, positions_BxS, prompt.filled_BxT
    )
    seen_BxV = jnp.zeros((batch, config.vocab_size), bool)
    seen_BxV = seen_BxV.at[jnp.arange(batch)[:, None], prompt_BxS].max(prompt_mask_BxS)
    start = _State(
        step=jnp.int32(0),
        cache=cache,
        token_B=jnp.zeros(batch, jnp.int32),
        done_B=jnp.zeros(batch, bool),
        lengths_B=jnp.zeros(batch, jnp.int32),
        seen_BxV=seen_BxV,
        key=key,
    )
    return _emit(start, logits_BxV, prompt, sampling, max_new_tokens), logits_BxV, prompt


def _step(params, state: _State, prompt: _Prompt, sampling, config, max_new_tokens):
    """One decoding step: the newest token through the layers, the next one drawn."""
    batch = state.token_B.shape[0]
    positions_Bx1 = jnp.full((batch, 1), prompt.length + state.step - 1)
    logits_BxV, cache = cached_logits(
        params, config, state.cache, state.token_B[:, None], positions_Bx1, prompt.filled_BxT
    )
    state = state._replace(cache=cache)
    return _emit(state, logits_BxV, prompt, sampling, max_new_tokens), logits_BxV


def _prompt(prompt_mask_BxS, stop_ids, pad_id, max_new_tokens) -> _Prompt:
    batch, length = prompt_mask_BxS.shape
    filled_BxT = jnp.concatenate([prompt_mask_BxS, jnp.ones((batch, max_new_tokens), bool)], 1)
    return _Prompt(filled_BxT, length, stop_ids, pad_id)


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "return_logits", "ring_cache")
)
def _generate(params, checked, *, config, max_new_tokens, return_logits, ring_cache):
    prompt_BxS = checked.prompt_BxS
    batch = prompt_BxS.shape[0]
    with jax.named_scope("prefill"):
        state, logits_BxV, prompt = _prefill(
            checked, params, config=config, max_new_tokens=max_new_tokens, ring_cache=ring_cache
        )
    tokens_BxN = jnp.full((batch, max_new_tokens), prompt.pad_id).at[:, 0].set(state.token_B)
    logits_BxNxV = None
    if return_logits:
        logits_BxNxV = jnp.zeros((batch, max_new_tokens, config.vocab_size), jnp.float32)
        logits_BxNxV = logits_BxNxV.at[:, 0].set(logits_BxV)

    def unfinished(carry):
        state = carry[0]
        return (state.step < max_new_tokens) & ~jnp.all(state.done_B)

    def decode(carry):
        state, tokens_BxN, logits_BxNxV = carry
        new, logits_BxV = _step(params, state, prompt, checked.sampling, config, max_new_tokens)
        tokens_BxN = tokens_BxN.at[:, state.step].set(new.token_B)
        if logits_BxNxV is not None:
            logits_BxNxV = logits_BxNxV.at[:, state.step].set(logits_BxV)
        return new, tokens_BxN, logits_BxNxV

    with jax.named_scope("decode"):
        state, tokens_BxN, logits_BxNxV = jax.lax.while_loop(
            unfinished, decode, (state, tokens_BxN, logits_BxNxV)
        )
    return Generation(jnp.concatenate([prompt_BxS, tokens_BxN], 1), state.lengths_B, logits_BxNxV)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "ring_cache"))
def _start(params, checked, *, config, max_new_tokens, ring_cache):
    state, _, prompt = _prefill(
        checked, params, config=config, max_new_tokens=max_new_tokens, ring_cache=ring_cache
    )
    return state, prompt.filled_BxT


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "chunk", "length"), donate_argnums=1
)
def _chunk(
    params, state, filled_BxT, stop_ids, pad_id, sampling, *, config, max_new_tokens, chunk, length
):
    prompt = _Prompt(filled_BxT, length, stop_ids, pad_id)

    def decode(state, _):
        state, _ = _step(params, state, prompt, sampling, config, max_new_tokens)
        return state, state.token_B

    state, tokens_CxB = jax.lax.scan(decode, state, length=chunk)
    return state, tokens_CxB.T


def _check(
    params,
    tokens,
    config,
    max_new_tokens,
    *,
    key=None,
    attn_mask=None,
    stop_tokens=(),
    pad_token=0,
    **sampling_options,
) -> _Checked:
    """Every argument of `generate`/`stream` checked, before anything is traced or run."""
    check_config(config, ("tokens", tokens))
    prompt_BxS = check_tokens("tokens", tokens, config)
    checks.prng_key("key", key, optional=True)
    checks.static_int("max_new_tokens", max_new_tokens, minimum=1)
    total = prompt_BxS.shape[1] + max_new_tokens
    if total > config.max_seq_len:
        raise ArgumentError(
            f"prompt length + max_new_tokens must be <= max_seq_len={config.max_seq_len}, "
            f"got {prompt_BxS.shape[1]} + {max_new_tokens} = {total}"
        )
    sampling = sampling_lib.settings(config.vocab_size, **sampling_options)
    greedy = sampling_options.get("temperature", 0.0) == 0
    if not greedy and key is None:
        raise ArgumentError("key must be a PRNG key when temperature > 0 (sampling), got None")
    last_id = config.vocab_size - 1
    if isinstance(stop_tokens, str | bytes) or not isinstance(stop_tokens, Sequence):
        raise ArgumentTypeError(f"stop_tokens must be a sequence of token ids, got {stop_tokens!r}")
    stop_ids = [
        checks.static_int(f"stop_tokens[{i}]", token, minimum=0, maximum=last_id)
        for i, token in enumerate(stop_tokens)
    ]
    pad_id = checks.static_int("pad_token", pad_token, minimum=0, maximum=last_id)
    prompt_mask_BxS = _checked_prompt_mask(attn_mask, prompt_BxS.shape)
    check_params(params, config)
    return _Checked(
        prompt_BxS,
        prompt_mask_BxS,
        None if greedy else key,
        sampling,
        jnp.asarray(stop_ids, jnp.int32),
        jnp.int32(pad_id),
    )


def generate(
    params: DecoderParams,
    tokens,
    config: DecoderConfig,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    attn_mask=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    return_logits: bool = False,
    ring_cache: bool = True,
) -> Generation:
    """Continues each prompt row by up to `max_new_tokens` tokens.

    The arguments follow `forward`'s: params, tokens, config, then the generation's own.

    Args:
      params: DecoderParams (stacked blocks).
      tokens: (B, S) int token ids in [0, V), one prompt per row; shorter prompts left-padded.
      config: the model's DecoderConfig.
      max_new_tokens: N >= 1 new tokens per row at most; S + N <= config.max_seq_len.
      key: PRNG key, required when sampling (temperature > 0).
      attn_mask: (B, S), True for real prompt tokens, False for the left padding of shorter
        prompts (as transformers' attention_mask); default: no padding.
      temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature).
      top_k, top_p, min_p: keep the k most likely tokens / the most likely ones summing to
        top_p / those at least min_p times as likely as the most likely (sampling only).
      repetition_penalty: > 1 makes tokens already in the row (prompt padding excluded) less
        likely, greedy or sampling, as transformers' `repetition_penalty`.
      stop_tokens: ids that end a row (e.g. the tokenizer's `eos_ids`); the row keeps its stop
        token, then emits `pad_token`. Generation ends when every row has stopped.
      pad_token: the id emitted after a row's stop token.
      return_logits: also return the (B, N, V) logits each token was drawn from (before the
        sampling transforms).
      ring_cache: sliding-window layers keep only their window's keys and values, in a ring
        (`scanlab.decoder.cache`); False keeps every position on every layer, the window only
        in the mask (the same tokens, more memory).

    Sampling settings are traced: changing them does not recompile.
    """
    checked = _check(
        params,
        tokens,
        config,
        max_new_tokens,
        key=key,
        attn_mask=attn_mask,
        stop_tokens=stop_tokens,
        pad_token=pad_token,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    return _generate(
        params,
        checked,
        config=config,
        max_new_tokens=max_new_tokens,
        return_logits=bool(return_logits),
        ring_cache=bool(ring_cache),
    )


def stream(
    params: DecoderParams,
    tokens,
    config: DecoderConfig,
    max_new_tokens: int,
    *,
    chunk: int = 1,
    ring_cache: bool = True,
    **options,
) -> Iterator[np.ndarray]:
    """`generate`'s tokens as they are produced: (B, c) int32 arrays, c <= chunk.

    `options` are `generate`'s keywords but `return_logits` (key, attn_mask, the sampling
    settings, stop_tokens, pad_token). `chunk` is the new tokens per compiled step (1 streams
    each token as soon as it exists). The concatenated chunks equal `generate`'s new tokens up
    to the last row's stop; every argument is checked before this returns.
    """
    checked = _check(params, tokens, config, max_new_tokens, **options)
    chunk = checks.static_int("chunk", chunk, minimum=1)
    return _stream(params, checked, config, max_new_tokens, chunk, bool(ring_cache))


def _stream(
    params, checked: _Checked, config, max_new_tokens, chunk, ring_cache
) -> Iterator[np.ndarray]:
    state, filled_BxT = _start(
        params, checked, config=config, max_new_tokens=max_new_tokens, ring_cache=ring_cache
    )
    yield np.asarray(state.token_B)[:, None]
    produced = 1
    while produced < max_new_tokens and not np.asarray(state.done_B).all():
        state, tokens_BxC = _chunk(
            params,
            state,
            filled_BxT,
            checked.stop_ids,
            checked.pad_id,
            checked.sampling,
            config=config,
            max_new_tokens=max_new_tokens,
            chunk=chunk,
            length=checked.prompt_BxS.shape[1],
        )
        tokens_BxC = np.asarray(tokens_BxC)[:, : max_new_tokens - produced]
        produced += tokens_BxC.shape[1]
        yield tokens_BxC


def _checked_prompt_mask(attn_mask, shape: tuple[int, ...]) -> jax.Array:
    """The mask as bool (B, S); it must pad on the left and leave each row a real token."""
    if attn_mask is None:
        return jnp.ones(shape, bool)
    mask = np.asarray(check_mask(attn_mask, shape))
    empty = ~mask.any(axis=1)
    if empty.any():
        raise ArgumentError(
            "attn_mask must leave each row at least one real token, got row "
            f"{int(np.argmax(empty))} all padding"
        )
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ArgumentError(
            "attn_mask must pad on the left (False before True in each row, the last token "
            "real), got a row with padding after a real token"
        )
    return jnp.asarray(mask)
