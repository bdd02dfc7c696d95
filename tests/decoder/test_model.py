import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanlab.decoder import forward, forward_loop, init_params, preset

jit_forward = jax.jit(forward, static_argnames=("config", "remat"))

CONFIG = preset("tiny").replace(dropout_rate=0.1)
# Same ops in the same order; only XLA's scheduling of the scanned vs unrolled body differs.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CONFIG.vocab_size)


def loss(fn, params, tokens, key=None, remat=False):
    logits = fn(params, tokens, CONFIG, key, remat=remat)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])


class TestScanVsLoop(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_logits(self):
        params = init_params(CONFIG, jax.random.PRNGKey(0))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CONFIG.vocab_size)
        for key in (None, jax.random.PRNGKey(7)):
            scan_fn = self.variant(lambda p, t, k: forward(p, t, CONFIG, k))
            loop_fn = self.variant(lambda p, t, k: forward_loop(p, t, CONFIG, k))
            np.testing.assert_allclose(
                scan_fn(params, tokens, key), loop_fn(params, tokens, key), rtol=RTOL, atol=ATOL
            )


@pytest.mark.parametrize("with_key", [False, True])
def test_scan_and_loop_gradients_agree(params, tokens, with_key):
    key = jax.random.PRNGKey(7) if with_key else None
    g_scan = jax.jit(jax.grad(lambda p: loss(forward, p, tokens, key)))(params)
    g_loop = jax.jit(jax.grad(lambda p: loss(forward_loop, p, tokens, key)))(params)
    chex.assert_trees_all_close(g_scan, g_loop, rtol=1e-4, atol=1e-6)


def test_dropout_only_with_a_key(params, tokens):
    no_key = jit_forward(params, tokens, CONFIG)
    np.testing.assert_array_equal(no_key, jit_forward(params, tokens, CONFIG))
    keyed = jit_forward(params, tokens, CONFIG, jax.random.PRNGKey(3))
    assert not np.allclose(no_key, keyed)
    np.testing.assert_array_equal(keyed, jit_forward(params, tokens, CONFIG, jax.random.PRNGKey(3)))


def test_remat_gives_the_same_gradients(params, tokens):
    key = jax.random.PRNGKey(5)
    plain = jax.jit(jax.grad(lambda p: loss(forward, p, tokens, key)))(params)
    remat = jax.jit(jax.grad(lambda p: loss(forward, p, tokens, key, remat=True)))(params)
    chex.assert_trees_all_close(plain, remat, rtol=1e-5, atol=1e-7)


def test_causal_through_gradients(params, tokens):
    """The logits at position t get zero gradient from the embeddings of positions after t."""
    t = 5
    grads = jax.jit(jax.grad(lambda x: _forward_from_embeddings(params, x)[:, t].sum()))(
        params.embed[tokens]
    )
    assert np.abs(grads[:, t + 1 :]).max() == 0.0
    assert np.abs(grads[:, : t + 1]).max() > 0.0


def _forward_from_embeddings(params, seq):
    from scanlab.decoder.model import causal_mask, run_layers, unembed

    mask = causal_mask(None, *seq.shape[:2])
    return unembed(params, run_layers(params.blocks, seq, mask, config=CONFIG), CONFIG)


def test_padding_mask_hides_padded_keys(params, tokens):
    mask = np.ones(tokens.shape, bool)
    mask[:, 3] = False
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % CONFIG.vocab_size)
    a = jit_forward(params, tokens, CONFIG, attn_mask_BxS=mask)
    b = jit_forward(params, changed, CONFIG, attn_mask_BxS=mask)
    np.testing.assert_allclose(a[:, 4:], b[:, 4:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        (
            jnp.zeros((12,), jnp.int32),
            ValueError,
            r"tokens must have shape \(B, S\), got shape \(12,\)",
        ),
        (jnp.zeros((1, 12)), TypeError, "tokens must be integer ids, got dtype float32"),
        (
            jnp.zeros((1, 129), jnp.int32),
            ValueError,
            "tokens must have S <= max_seq_len=128, got S=129",
        ),
    ],
)
def test_bad_tokens(params, tokens, error, match):
    with pytest.raises(error, match=match):
        forward(params, tokens, CONFIG)
