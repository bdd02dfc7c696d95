import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.traces import traced

from scanlab.decoder import forward, forward_loop, init_params, preset

CONFIG = preset("tiny").replace(dropout_rate=0.1)
# Same ops in the same order; only XLA's scheduling of the scanned vs unrolled body differs.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CONFIG.vocab_size)


def loss(fn, params, tokens, key=None, remat="none"):
    logits = fn(params, tokens, CONFIG, key=key, remat=remat)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])


class TestScanVsLoop(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_logits(self):
        params = init_params(CONFIG, jax.random.PRNGKey(0))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CONFIG.vocab_size)
        for key in (None, jax.random.PRNGKey(7)):
            scan_fn = self.variant(lambda p, t, k: forward(p, t, CONFIG, key=k))
            loop_fn = self.variant(lambda p, t, k: forward_loop(p, t, CONFIG, key=k))
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
    no_key = forward(params, tokens, CONFIG)
    np.testing.assert_array_equal(no_key, forward(params, tokens, CONFIG))
    keyed = forward(params, tokens, CONFIG, key=jax.random.PRNGKey(3))
    assert not np.allclose(no_key, keyed)
    np.testing.assert_array_equal(keyed, forward(params, tokens, CONFIG, key=jax.random.PRNGKey(3)))


@pytest.mark.parametrize("remat", ["full", "dots", "sqrt"])
def test_every_remat_policy_gives_the_same_gradients(params, tokens, remat):
    key = jax.random.PRNGKey(5)
    plain = jax.jit(jax.grad(lambda p: loss(forward, p, tokens, key)))(params)
    policy = jax.jit(jax.grad(lambda p: loss(forward, p, tokens, key, remat=remat)))(params)
    # Recomputation replays the same float32 ops; XLA may fuse them differently: entries near
    # zero differ by f32 rounding of sums of terms up to ~0.1 (1.2e-7 seen), so atol is 1e-6.
    chex.assert_trees_all_close(plain, policy, rtol=1e-5, atol=1e-6)


def test_the_loop_twin_takes_the_per_layer_policies_and_refuses_sqrt(params, tokens):
    scan = jax.grad(lambda p: loss(forward, p, tokens, remat="dots"))(params)
    chex.assert_trees_all_close(
        scan,
        jax.grad(lambda p: loss(forward_loop, p, tokens, remat="dots"))(params),
        rtol=1e-4,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="remat='sqrt' nests the layer scan"):
        forward_loop(params, tokens, CONFIG, remat="sqrt")
    with pytest.raises(
        ValueError, match=r"remat must be one of \['none', 'full', 'dots', 'sqrt'\], got True"
    ):
        forward(params, tokens, CONFIG, remat=True)


def test_forward_compiles_once_per_signature(params, tokens):
    forward(params, tokens, CONFIG)
    with traced() as traces:
        forward(params, tokens + 1, CONFIG)  # new values, same signature
        forward(params, np.asarray(tokens), CONFIG)  # NumPy in: same program
    assert traces["_forward"] == 0
    with traced() as traces:
        forward(params, tokens[:, :5], CONFIG)  # a new shape is a new program
    assert traces["_forward"] == 1


def test_causal_through_gradients(params, tokens):
    """The logits at position t get zero gradient from the embeddings of positions after t."""
    t = 5
    grads = jax.jit(jax.grad(lambda x: _forward_from_embeddings(params, x)[:, t].sum()))(
        params.embed[tokens]
    )
    assert np.abs(grads[:, t + 1 :]).max() == 0.0
    assert np.abs(grads[:, : t + 1]).max() > 0.0


def _forward_from_embeddings(params, seq):
    from scanlab.decoder.model import causal_mask, unembed
    from scanlab.decoder.stack import run_layers

    mask = causal_mask(None, *seq.shape[:2])
    return unembed(params, run_layers(params.blocks, seq, mask, config=CONFIG), CONFIG)


def test_padding_mask_hides_padded_keys(params, tokens):
    mask = np.ones(tokens.shape, bool)
    mask[:, 3] = False
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % CONFIG.vocab_size)
    a = forward(params, tokens, CONFIG, attn_mask=mask)
    b = forward(params, changed, CONFIG, attn_mask=mask)
    np.testing.assert_allclose(a[:, 4:], b[:, 4:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (
            jnp.zeros((12,), jnp.int32),
            ValueError,
            r"tokens must have shape \(B, S\) with B >= 1, got shape \(12,\)",
        ),
        (jnp.zeros((1, 12)), TypeError, "tokens must be integer token ids, got dtype float32"),
        (
            jnp.zeros((1, 129), jnp.int32),
            ValueError,
            "tokens must have 1 <= S <= max_seq_len=128, got S=129",
        ),
        (
            jnp.zeros((1, 0), jnp.int32),
            ValueError,
            "tokens must have 1 <= S <= max_seq_len=128, got S=0",
        ),
        (
            jnp.array([[1, 64]]),
            ValueError,
            r"tokens must be ids in \[0, vocab_size=64\), got tokens\[0, 1\] = 64",
        ),
        (jnp.array([[-1, 3]]), ValueError, r"got tokens\[0, 0\] = -1"),
        ([[1.5]], TypeError, "tokens must be integer token ids, got dtype float64"),
    ],
)
def test_bad_tokens(params, tokens, error, match):
    with pytest.raises(error, match=match):
        forward(params, tokens, CONFIG)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        # An additive mask cast to bool would be inverted (0 -> False where attended): refused.
        (
            np.where(np.ones((2, 12), bool), 0.0, -np.inf),
            TypeError,
            r"attn_mask must be boolean \(True for real tokens\) or integers 0/1, got dtype "
            r"float64; an additive mask \(0 / -inf\) converts with attn_mask == 0",
        ),
        (np.full((2, 12), 2), ValueError, r"attn_mask must hold only 0 and 1 \(or be boolean\)"),
    ],
)
def test_a_mask_that_is_not_boolean_or_0_1_is_refused(params, tokens, mask, error, match):
    with pytest.raises(error, match=match):
        forward(params, tokens, CONFIG, attn_mask=mask)


def test_an_integer_0_1_mask_equals_the_boolean_one(params, tokens):
    mask = np.ones((2, 12), bool)
    mask[0, :5] = False
    np.testing.assert_array_equal(
        forward(params, tokens, CONFIG, attn_mask=mask.astype(np.int64)),
        forward(params, tokens, CONFIG, attn_mask=mask),
    )
