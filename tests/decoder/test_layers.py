import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder import init_params, preset
from scanlab.decoder.layers import apply_rope, attention, decoder_block, rms_norm, rope_phases
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

    def rotated_score(p_q, p_k):
        cos_q, sin_q = rope_phases(jnp.array([[p_q]]), 16, 10_000.0)
        cos_k, sin_k = rope_phases(jnp.array([[p_k]]), 16, 10_000.0)
        return jnp.sum(apply_rope(q, cos_q, sin_q) * apply_rope(k, cos_k, sin_k))

    cos, sin = rope_phases(jnp.array([[9]]), 16, 10_000.0)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, cos, sin)), jnp.linalg.norm(q), rtol=1e-6
    )
    # The score depends only on the offset between positions.
    np.testing.assert_allclose(rotated_score(7, 3), rotated_score(14, 10), rtol=1e-4)


def test_grouped_query_heads_share_their_kv_head():
    """With equal q weights for the R heads of a group, their outputs are equal."""
    layer = unstack_layers(init_params(CONFIG, jax.random.PRNGKey(0)).blocks)[0]
    q = layer.attention.q_proj  # (D, R, K, Dh)
    same_q = jnp.broadcast_to(q[:, :1], q.shape)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, CONFIG.d_model))
    positions = jnp.arange(5)[None]
    mask = jnp.tril(jnp.ones((5, 5), bool))[None]
    out_proj = jnp.zeros_like(layer.attention.out_proj).at[0].set(layer.attention.out_proj[0])
    a, _ = jax.jit(attention, static_argnums=4)(
        layer.attention._replace(q_proj=same_q, out_proj=out_proj), x, positions, mask, CONFIG
    )
    moved = out_proj[::-1]  # the same output weights on the other query head of each group
    b, _ = jax.jit(attention, static_argnums=4)(
        layer.attention._replace(q_proj=same_q, out_proj=moved), x, positions, mask, CONFIG
    )
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_block_is_residual_and_keeps_shape():
    layer = unstack_layers(init_params(CONFIG, jax.random.PRNGKey(0)).blocks)[0]
    seq = jax.random.normal(jax.random.PRNGKey(2), (2, 6, CONFIG.d_model))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((6, 6), bool)), (2, 6, 6))
    block = jax.jit(lambda layer, seq: decoder_block(layer, seq, mask, config=CONFIG)[0])
    out = block(layer, seq)
    assert out.shape == seq.shape
    zeroed = layer._replace(
        attention=layer.attention._replace(out_proj=jnp.zeros_like(layer.attention.out_proj)),
        down_proj=jnp.zeros_like(layer.down_proj),
    )
    np.testing.assert_array_equal(block(zeroed, seq), seq)
