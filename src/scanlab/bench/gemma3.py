"""W13: Gemma 3 270M, the heterogeneous layer scan on a real model.

Decoding against transformers and llama.cpp on the same GGUF and against the bandwidth bound
(as W7 does for SmolLM2); decoding steps at long contexts with ring caches for the sliding
layers against full-length caches on every layer; the first-call compile time of the one
scan body over 15 sliding and 3 full layers against a Python loop over the 18.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.bench import decoding as w7
from scanlab.decoder import chat, forward, forward_loop, generate, qmatvec
from scanlab.decoder.cache import cache_bytes, init_cache
from scanlab.decoder.formats import pretrained
from scanlab.decoder.generation import cached_logits
from scanlab.timing import compile_seconds

PROMPTS = [  # a base model: texts to continue, not questions
    "The capital of France is",
    "A for loop repeats",
    "The three primary colors are",
    "The sea at night",
    "Twelve times twelve equals",
    "The sky is blue because",
    "To learn to code, start by",
    "A compiler translates",
]
CONTEXTS = (1024, 8192, 32768)

SCANLAB_RING = "scanlab f32 (ring caches)"
SCANLAB_FULL = "scanlab f32 (full-length caches)"
SCANLAB_KEPT = "scanlab GGUF blocks kept as int8 (ring caches)"
SCANLAB_KERNEL = "scanlab GGUF blocks, jax.ffi kernel (ring caches)"
TRANSFORMERS = "transformers f32"
LLAMA_CPP = "llama.cpp (Q4_K_M file)"


def prompts(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S) plain-text prompts (BOS first), left-padded, and their mask."""
    return chat.left_padded([tokenizer.encode(p) for p in PROMPTS[:batch]], tokenizer.pad_id)


def measure(new_tokens: int = 64, batches=(1, 8), rounds: int = 3) -> dict[str, Any]:
    """W13's figures: tokens/s per contender and batch, the bandwidth bound, decoding steps at
    long contexts (ring vs full-length caches), compile times (scan vs loop)."""
    path = pretrained.fetch(pretrained.GEMMA3_270M)
    models, memory = w7.load_models(path, forms=("kernel", "quantized", "float32"))
    config, params, tokenizer = models["float32"]
    kept = models["quantized"].params
    bandwidth = w7.copy_bandwidth()
    results = w7.run_record(pretrained.GEMMA3_270M.name, new_tokens, bandwidth)
    results["memory"] = memory
    results["quantized_path"] = qmatvec.describe()
    for batch in batches:
        tokens, mask = prompts(tokenizer, batch)
        fns = {
            SCANLAB_RING: _generating(params, tokens, mask, config, new_tokens, ring=True),
            SCANLAB_FULL: _generating(params, tokens, mask, config, new_tokens, ring=False),
            SCANLAB_KEPT: _generating(kept, tokens, mask, config, new_tokens, ring=True),
        }
        if "kernel" in models:
            on_kernel = models["kernel"].params
            fns[SCANLAB_KERNEL] = _generating(
                on_kernel, tokens, mask, config, new_tokens, ring=True
            )
        for name, fn in (
            (TRANSFORMERS, w7.transformers_contender(path, tokens, mask, new_tokens)),
            (LLAMA_CPP, w7.llama_cpp_contender(path, tokens, new_tokens) if batch == 1 else None),
        ):
            if fn is not None:
                fns[name] = fn
        results["contenders"] += w7.timed_contenders(fns, batch, new_tokens, rounds)
        context = tokens.shape[1] + new_tokens // 2  # the average cache length read per step
        results["bounds"].append(w7.bandwidth_bound(config, "f32", batch, context, bandwidth))
        for form, name in (("kept", "quantized"), ("kernel", "kernel")):
            if name in models:
                kept_bytes = memory["resident_bytes"][name]
                results["bounds"].append(
                    w7.bandwidth_bound(config, form, batch, context, bandwidth, kept_bytes)
                )
    results["contexts"] = [
        context_point(config, params, context, ring)
        for context in CONTEXTS
        for ring in (True, False)
    ]
    results["compile"] = compile_times(config, params, prompts(tokenizer, 1)[0])
    return results


def _generating(params, tokens, mask, config, new_tokens: int, ring: bool):
    def run():
        return generate(params, tokens, config, new_tokens, attn_mask=mask, ring_cache=ring).tokens

    return run


@functools.partial(jax.jit, static_argnames="config", donate_argnums=1)
def _decoding_step(params, cache, token_Bx1, positions_Bx1, filled_BxT, *, config):
    """One decoding step: a token through the layers against the cache, the next one out."""
    logits_BxV, cache = cached_logits(params, config, cache, token_Bx1, positions_Bx1, filled_BxT)
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32), cache


def context_point(config, params, context: int, ring: bool, steps: int = 8) -> dict[str, Any]:
    """Decoding steps at positions context, context + 1, ... of one row, the cache as big as
    a `context + steps` generation keeps (its contents do not change the work)."""
    cache = init_cache(config, 1, context + steps, bounded=ring)
    n_bytes = cache_bytes(cache)
    filled = jnp.ones((1, context + steps), bool)
    token = jnp.zeros((1, 1), jnp.int32)
    times = []
    for i in range(steps + 1):  # the first is compilation
        positions = jnp.full((1, 1), context + i - 1, jnp.int32)
        start = time.perf_counter()
        token_B, cache = _decoding_step(params, cache, token, positions, filled, config=config)
        jax.block_until_ready(token_B)
        times.append(time.perf_counter() - start)
        token = token_B[:, None]
    step_s = statistics.median(times[1:])
    return dict(
        context=context,
        ring=ring,
        cache_bytes=n_bytes,
        step_s=step_s,
        tokens_per_s=1.0 / step_s,
    )


def compile_times(config, params, tokens: np.ndarray) -> dict[str, float]:
    """Seconds to lower and compile the forward pass: one scan body vs 18 unrolled layers."""
    return {
        name: compile_seconds(jax.jit(functools.partial(fn, config=config)), params, tokens)[1]
        for name, fn in (("scan", forward), ("loop", forward_loop))
    }
