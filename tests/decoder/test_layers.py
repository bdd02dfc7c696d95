import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder import init_params, preset, rope
from scanlab.decoder.layers import (
    apply_rope,
    attend,
    decoder_block,
    layer_kinds,
    rms_norm,
    rope_phases,
    self_attend,
    within_window,
)
from scanlab.decoder.params import unstack_layers

CONFIG = preset("tiny")


def test_rms_norm_matches_its_formula():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    w = np.arange(8.0, dtype=np.float32)
    x = np.asarray(x)
    expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(x, w, 1e-5), expected, rtol=1e-5, atol=1e-6)


def test_rope_preserves_norms_and_makes_scores_relative():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 16))

    inv_freq = jnp.asarray(rope.inverse_frequencies(16, 10_000.0, None), jnp.float32)

    def rotated_score(p_q, p_k):
        cos_q, sin_q = rope_phases(jnp.array([[p_q]]), inv_freq)
        cos_k, sin_k = rope_phases(jnp.array([[p_k]]), inv_freq)
        return jnp.sum(apply_rope(q, cos_q, sin_q) * apply_rope(k, cos_k, sin_k))

    cos, sin = rope_phases(jnp.array([[9]]), inv_freq)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, cos, sin)), jnp.linalg.norm(q), rtol=1e-6
    )
    # The score depends only on the offset between positions.
    np.testing.assert_allclose(rotated_score(7, 3), rotated_score(14, 10), rtol=1e-4)


def test_a_layer_without_rotary_leaves_q_and_k_as_they_are_and_yarn_scales_the_rotation():
    config = CONFIG.replace(
        no_rope_layers=(1,),
        rope_scaling=rope.RopeScaling(kind="yarn", factor=4.0, original_max_seq_len=32),
    )
    kinds = layer_kinds(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, config.head_dim))
    positions = jnp.arange(5, 8)[None]
    cos, sin = rope_phases(positions, kinds.inv_freq[1], kinds.rope_factor[1])
    np.testing.assert_array_equal(apply_rope(x, cos, sin), x)
    np.testing.assert_allclose(kinds.rope_factor, [1.1386294, 1.0, 1.1386294, 1.1386294], rtol=1e-6)
    cos, sin = rope_phases(positions, kinds.inv_freq[0], kinds.rope_factor[0])
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(x, cos, sin), axis=-1),
        jnp.linalg.norm(x, axis=-1) * (0.1 * np.log(4.0) + 1.0),
        rtol=1e-5,
    )


def test_gemma_norm_scales_by_one_plus_its_weight_in_float32():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8)), np.float32)
    w = np.linspace(-1, 1, 8, dtype=np.float32)
    normed = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rms_norm(x, w, 1e-6, plus_one=True), normed * (1 + w), rtol=1e-5)


def test_a_window_of_w_keeps_the_query_and_the_w_minus_1_keys_before_it():
    positions = jnp.arange(6)[None]
    causal = jnp.tril(jnp.ones((6, 6), bool))[None]
    mask = np.asarray(within_window(causal, positions, positions, 3))[0]
    i, j = np.indices((6, 6))
    np.testing.assert_array_equal(mask, (0 <= i - j) & (i - j < 3))


def test_grouped_query_heads_share_their_kv_head():
    """Query heads r of one group with equal queries attend alike; the K groups differ."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 2, 16))  # B S R K Dh
    q = q.at[:, :, 1].set(q[:, :, 0])
    k, v = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 5, 2, 16))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None]
    out = np.asarray(attend(q, k, v, mask, 0.25))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    assert not np.allclose(out[:, :, 0, 0], out[:, :, 0, 1])


def test_block_is_residual_and_keeps_shape():
    layer = unstack_layers(init_params(CONFIG, jax.random.PRNGKey(0)).blocks)[0]
    seq = jax.random.normal(jax.random.PRNGKey(2), (2, 6, CONFIG.d_model))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((6, 6), bool)), (2, 6, 6))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    kind = jax.tree.map(lambda leaf: leaf[0], layer_kinds(CONFIG))

    @jax.jit
    def block(layer, seq):
        attend_fn = self_attend(mask, positions, kind, CONFIG)
        out, _ = decoder_block(
            layer,
            seq,
            attend_fn,
            config=CONFIG,
            positions_BxS=positions,
            kind=kind,
        )
        return out

    out = block(layer, seq)
    assert out.shape == seq.shape
    zeroed = layer._replace(
        attention=layer.attention._replace(out_proj=jnp.zeros_like(layer.attention.out_proj)),
        down_proj=jnp.zeros_like(layer.down_proj),
    )
    np.testing.assert_array_equal(block(zeroed, seq), seq)
