"""KV caches: the ring's slots and masks, and XLA updating both stacks in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanlab.decoder import DecoderConfig, generation, init_cache, init_params
from scanlab.decoder.cache import cache_slots, step_masks

CONFIG = DecoderConfig(
    vocab_size=64,
    n_layers=8,
    d_model=32,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    mlp_dim=48,
    max_seq_len=256,
    family="gemma3",
    sliding_window=8,
)


def test_each_layer_has_a_slice_of_its_own_stack():
    slots = cache_slots(CONFIG, init_cache(CONFIG, 1, 64))
    # Layers 0-4, 6, 7 sliding (rings 0..6), layer 5 full (slice 0).
    np.testing.assert_array_equal(slots.in_ring, [1, 1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(slots.stack_index, [0, 1, 2, 3, 4, 0, 5, 6])
    full = cache_slots(CONFIG, init_cache(CONFIG, 1, 64, bounded=False))
    np.testing.assert_array_equal(full.stack_index, np.arange(8))


def test_the_ring_mask_sees_the_window_of_real_tokens_before_each_query():
    """Step at position 11 (2 new tokens), window 8, row 0 left-padded by 1: slot j holds the
    latest position < 11 congruent to j mod 8; query p sees keys p-7..p that are real."""
    cache = init_cache(CONFIG, 2, 20)
    positions = jnp.array([[11, 12], [11, 12]])
    filled = jnp.ones((2, 20), bool).at[0, 0].set(False)
    ring = np.asarray(step_masks(cache, positions, filled, CONFIG).ring_BxSxU)
    held = np.array([8, 9, 10, 3, 4, 5, 6, 7])  # the positions in slots 0..7 before the step
    keys = np.concatenate([held, [11, 12]])
    for row in range(2):
        for s, query in enumerate((11, 12)):
            expected = (keys <= query) & (query - keys < 8) & np.asarray(filled[row])[keys]
            np.testing.assert_array_equal(ring[row, s], expected)


@pytest.mark.parametrize("ring", [True, False])
def test_decoding_copies_no_cache_stack(ring):
    """A copy of a stack per layer and step would cost more than the attention reads."""
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    tokens = np.zeros((1, 12), np.int32)
    checked = generation._check(params, tokens, CONFIG, 20)
    hlo = (
        generation._generate.lower(
            params,
            checked,
            config=CONFIG,
            max_new_tokens=20,
            return_logits=False,
            ring_cache=ring,
        )
        .compile()
        .as_text()
    )
    stacks = r"f32\[\d+,1,(32|8),1,16\]"  # (N, B, T or W, K, Dh)
    # Copies of the empty cache's zeros (k and v made distinct, once) are not per step.
    copies = [
        line
        for line in hlo.splitlines()
        if re.search(rf"= {stacks}\S* copy\((?!%wrapped_broadcast)", line)
    ]
    assert copies == []
