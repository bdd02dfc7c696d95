"""Each logits transform against the transformers logits processor of the same name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import generation as hf

from scanlab.decoder import sampling

B, V = 4, 50


def random_logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, V)) * rng.uniform(0.5, 4.0)).astype(np.float32)


def random_ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, V, (B, 7))


def seen_of(ids: np.ndarray) -> jnp.ndarray:
    return jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].set(True)


def hf_apply(processor, logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return processor(torch.tensor(ids), torch.tensor(logits)).numpy()


# Each scanlab transform and its transformers processor at the same setting.
CASES = {
    "repetition_penalty": (
        st.floats(0.5, 2.0),
        lambda x, ids, p: sampling.penalize_repetition(x, seen_of(ids), jnp.float32(p)),
        hf.RepetitionPenaltyLogitsProcessor,
    ),
    "top_k": (
        st.integers(1, V),
        lambda x, ids, k: sampling.keep_top_k(x, jnp.int32(k)),
        hf.TopKLogitsWarper,
    ),
    "top_p": (
        st.floats(0.05, 1.0),
        lambda x, ids, p: sampling.keep_top_p(x, jnp.float32(p)),
        hf.TopPLogitsWarper,
    ),
    "min_p": (
        st.floats(0.0, 1.0),
        lambda x, ids, p: sampling.keep_min_p(x, jnp.float32(p)),
        hf.MinPLogitsWarper,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transform_equals_transformers_processor(name):
    values, ours, processor = CASES[name]

    @settings(max_examples=40, deadline=None)
    @given(value=values, seed=st.integers(0, 2**16))
    def check(value, seed):
        logits, ids = random_logits(seed), random_ids(seed)
        expected = hf_apply(processor(value), logits, ids)
        got = np.asarray(jax.jit(ours)(logits, ids, value))
        # Removed tokens are -inf in both; kept ones equal to float32 rounding (1e-6 relative).
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
        kept = ~np.isneginf(expected)
        np.testing.assert_allclose(got[kept], expected[kept], rtol=1e-6)

    check()


def test_warp_equals_transformers_processor_chain():
    """All settings at once, in transformers' order, as `generate(do_sample=True)` builds it."""
    chain = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(1.3),
            hf.TemperatureLogitsWarper(0.7),
            hf.TopKLogitsWarper(20),
            hf.TopPLogitsWarper(0.9),
            hf.MinPLogitsWarper(0.05),
        ]
    )
    setting = sampling.settings(
        V, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3
    )
    for seed in range(20):
        logits, ids = random_logits(seed), random_ids(seed)
        expected = hf_apply(chain, logits, ids)
        got = np.asarray(sampling.warp(logits, seen_of(ids), setting))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
        kept = ~np.isneginf(expected)
        np.testing.assert_allclose(got[kept], expected[kept], rtol=1e-6)


def test_neutral_settings_change_nothing():
    logits = random_logits(0)
    got = sampling.warp(logits, seen_of(random_ids(0)), sampling.settings(V, temperature=1.0))
    np.testing.assert_array_equal(np.asarray(got), logits)
