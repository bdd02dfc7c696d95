"""The NNX layer stack against the functional decoder on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scanlab import decoder, pitfalls
from scanlab.decoder.layers import layer_kinds
from scanlab.decoder.model import causal_mask
from scanlab.nnx.stack import LAYER_SCANS, NNXDecoder

# Same block function on the same weights; only the scan machinery around it differs.
RTOL, ATOL = 1e-5, 1e-5
GQA_TIED = decoder.preset("tiny").replace(tie_embeddings=True)
MHA = decoder.preset("tiny").replace(n_kv_heads=4, n_layers=3)
FORMS = list(LAYER_SCANS)


def tokens_for(config, seed=1, shape=(2, 9)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, config.vocab_size)


@pytest.mark.parametrize("config", [GQA_TIED, MHA], ids=["gqa-tied", "mha"])
@pytest.mark.parametrize("layer_scan", FORMS)
def test_logits_equal_the_functional_decoder(config, layer_scan):
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    tokens = tokens_for(config)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    model = NNXDecoder.from_params(params, config, layer_scan=layer_scan)
    np.testing.assert_allclose(
        model(tokens, mask),
        decoder.forward(params, tokens, config, attn_mask=mask),
        rtol=RTOL,
        atol=ATOL,
    )


def test_weights_convert_both_ways_exactly():
    params = decoder.init_params(GQA_TIED, jax.random.PRNGKey(0))
    back = NNXDecoder.from_params(params, GQA_TIED).to_params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_nnx_initialised_model_is_a_valid_functional_model():
    model = NNXDecoder(MHA, rngs=nnx.Rngs(params=3))
    params = model.to_params()
    tokens = tokens_for(MHA)
    np.testing.assert_allclose(
        model(tokens), decoder.forward(params, tokens, MHA), rtol=RTOL, atol=ATOL
    )
    # Split RNGs under vmap: every layer drew its own weights.
    q = np.asarray(params.blocks.attention.q_proj)
    assert all(not np.allclose(q[0], q[i]) for i in range(1, MHA.n_layers))


@pytest.mark.parametrize("layer_scan", FORMS)
def test_gradients_equal_the_functional_decoders(layer_scan):
    params = decoder.init_params(MHA, jax.random.PRNGKey(0))
    tokens = tokens_for(MHA)

    def functional_loss(params):
        return jax.nn.logsumexp(decoder.forward(params, tokens, MHA)).sum()

    model = NNXDecoder.from_params(params, MHA, layer_scan=layer_scan)
    grads = nnx.grad(lambda m: jax.nn.logsumexp(m(tokens)).sum())(model)
    expected = jax.grad(functional_loss)(params)
    np.testing.assert_allclose(
        grads.blocks.block.gate_proj[...], expected.blocks.gate_proj, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(grads.embed[...], expected.embed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_scan", FORMS)
def test_dropout_draws_a_new_mask_per_call_and_none_in_eval_mode(layer_scan):
    config = MHA.replace(dropout_rate=0.3)
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    model = NNXDecoder.from_params(params, config, rngs=nnx.Rngs(dropout=5), layer_scan=layer_scan)
    tokens = tokens_for(config)
    first = pitfalls.check_rngs_advance(model, lambda: model(tokens))
    second = pitfalls.check_rngs_advance(model, lambda: model(tokens))
    assert not np.allclose(first, second)
    model.eval()
    np.testing.assert_allclose(
        model(tokens), decoder.forward(params, tokens, config), rtol=RTOL, atol=ATOL
    )


def test_dropout_draws_a_different_mask_per_layer():
    # All layers share one set of weights: any difference between two layers is their dropout.
    config = MHA.replace(dropout_rate=0.5)
    layer = decoder.init_params(config, jax.random.PRNGKey(0)).blocks
    same = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf[:1], leaf.shape), layer)
    params = decoder.init_params(config, jax.random.PRNGKey(0))._replace(blocks=same)
    stack = NNXDecoder.from_params(params, config, rngs=nnx.Rngs(dropout=2)).blocks
    graphdef, state = nnx.split(stack)
    seq = jax.random.normal(jax.random.PRNGKey(3), (1, 5, config.d_model))
    mask = causal_mask(None, 1, 5)
    kinds = layer_kinds(config)
    outs = [
        nnx.merge(graphdef, jax.tree.map(lambda leaf, i=i: leaf[i], state))(
            seq, mask, jax.tree.map(lambda leaf, i=i: leaf[i], kinds)
        )
        for i in range(config.n_layers)
    ]
    for i in range(1, config.n_layers):
        assert not np.allclose(outs[0], outs[i])


def test_bad_arguments_are_named():
    with pytest.raises(
        ValueError,
        match=r"layer_scan must be one of \['nnx.scan', 'split-lax.scan-merge'\], got 'python'",
    ):
        NNXDecoder(MHA, rngs=nnx.Rngs(0), layer_scan="python")
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs \(e.g. nnx.Rngs\(0\)\), got 0"):
        NNXDecoder(MHA, rngs=0)
    with pytest.raises(TypeError, match="config must be a DecoderConfig, got dict"):
        NNXDecoder({}, rngs=nnx.Rngs(0))
    params = decoder.init_params(GQA_TIED, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="layers on its leading axis, expected n_layers=3"):
        NNXDecoder.from_params(params, MHA.replace(tie_embeddings=True))


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        # The embedding gather would clamp an out-of-vocabulary id silently.
        (
            np.array([[1, 64]]),
            ValueError,
            r"tokens must be ids in \[0, vocab_size=64\), got tokens\[0, 1\] = 64",
        ),
        (
            np.ones((1, 129), np.int32),
            ValueError,
            r"tokens must have 1 <= S <= max_seq_len=128, got S=129",
        ),
        (
            np.ones(5, np.int32),
            ValueError,
            r"tokens must have shape \(B, S\) with B >= 1, got shape \(5,\)",
        ),
        (np.ones((1, 5)), TypeError, "tokens must be integer token ids, got dtype float64"),
    ],
)
def test_the_nnx_model_checks_tokens_as_forward_does(tokens, error, match):
    model = NNXDecoder(MHA, rngs=nnx.Rngs(0))
    with pytest.raises(error, match=match):
        model(tokens)
    with pytest.raises(error, match=match):
        decoder.forward(model.to_params(), tokens, MHA)
