"""Weights kept quantized: the projection seam, `quantize`, and the quantized tree against its
dequantized dense twin (forward, generation, gradients, sharding), and the bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanlab.decoder import (
    DecoderConfig,
    QuantArray,
    VocabChunks,
    check_params,
    dequantize,
    forward,
    generate,
    init_params,
    param_bytes,
    param_count,
    preset,
    quant,
    quantize,
    weights,
)
from scanlab.decoder.config import check_weights
from scanlab.errors import ArgumentError, ArgumentTypeError

LLAMA = preset("tiny").replace(head_dim=32)  # Dh a multiple of the block: out_proj blocks fit
CONFIGS = {
    "llama": LLAMA,
    "llama-tied": LLAMA.replace(tie_embeddings=True),
    "qwen2": LLAMA.replace(family="qwen2"),
    "gemma3": DecoderConfig(
        vocab_size=80,
        n_layers=6,
        d_model=64,
        n_heads=2,
        n_kv_heads=1,
        head_dim=32,
        mlp_dim=96,
        max_seq_len=64,
        family="gemma3",
        sliding_window=4,
    ),
}
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 11))
# The twin runs the same dots on the same f32 matrices; XLA may order the sums differently.
TWIN_ATOL = 1e-5


def dense_twin(params):
    """Every quantized leaf dequantized: the dense tree the quantized one stands for."""
    return jax.tree.map(
        lambda leaf: weights.as_dense(leaf) if quant.is_quantized(leaf) else leaf,
        params,
        is_leaf=quant.is_quantized,
    )


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    config = CONFIGS[request.param]
    params = quantize(init_params(config, jax.random.PRNGKey(0)), config)
    return config, params


def test_every_weight_matrix_is_quantized_norms_and_biases_are_not(model):
    config, params = model
    head = params.embed if config.tie_embeddings else params.lm_head
    assert isinstance(head, VocabChunks)
    assert isinstance(params.blocks.attention.out_proj, QuantArray)
    assert isinstance(params.blocks.down_proj, QuantArray)
    assert not quant.is_quantized(params.blocks.input_norm)
    if config.family == "qwen2":
        assert not quant.is_quantized(params.blocks.attention.q_bias)
    check_params(params, config)


def test_forward_equals_the_dequantized_twin(model):
    config, params = model
    np.testing.assert_allclose(
        forward(params, TOKENS, config),
        forward(dense_twin(params), TOKENS, config),
        atol=TWIN_ATOL,
        rtol=0,
    )


def test_greedy_generation_equals_the_dequantized_twin(model):
    config, params = model
    ours = generate(params, TOKENS[:, :5], config, 8, return_logits=True)
    twin = generate(dense_twin(params), TOKENS[:, :5], config, 8, return_logits=True)
    np.testing.assert_array_equal(ours.tokens, twin.tokens)
    np.testing.assert_allclose(ours.logits, twin.logits, atol=TWIN_ATOL, rtol=0)


def test_gradients_of_dense_leaves_through_quantized_weights_equal_the_twin_s(model):
    """Norms train over frozen quantized weights as over their dense twin."""
    config, params = model

    def loss(norms, tree):
        tree = tree._replace(final_norm=norms[0], blocks=tree.blocks._replace(mlp_norm=norms[1]))
        return jnp.mean(jax.nn.log_softmax(forward(tree, TOKENS, config))[..., 0])

    norms = (params.final_norm, params.blocks.mlp_norm)
    ours = jax.grad(loss)(norms, params)
    twin = jax.grad(loss)(norms, dense_twin(params))
    for got, expected in zip(ours, twin, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_the_seam_is_the_einsum_on_dense_weights_and_their_gradients():
    rng = np.random.default_rng(1)
    x, w = (
        jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.float32),
        jnp.asarray(rng.normal(size=(64, 5, 7)), jnp.float32),
    )

    def through_seam(w):
        return jnp.sum(weights.project("bsd,dkh->bskh", x, w) ** 2)

    def plain(w):
        return jnp.sum(jnp.einsum("bsd,dkh->bskh", x, w) ** 2)

    np.testing.assert_array_equal(jax.grad(through_seam)(w), jax.grad(plain)(w))


def test_quantize_blocks_is_q8_0_within_half_a_step():
    dense = np.random.default_rng(2).normal(size=(96, 40)).astype(np.float32)
    array = quant.quantize_blocks(dense, axis=-2, block=32)
    assert array.values.dtype == jnp.int8 and array.scales.shape == (3, 40)
    step = np.repeat(np.asarray(array.scales, np.float32), 32, axis=0)
    error = np.abs(np.asarray(dequantize(array)) - dense)
    # Half a step, plus the f16 rounding of the scale (127 steps of relative error 2**-11).
    assert (error <= step * (0.5 + 127 * 2.0**-11)).all()


def test_param_bytes_count_values_and_scales():
    config = CONFIGS["llama"]
    dense = init_params(config, jax.random.PRNGKey(0))
    params = quantize(dense, config)
    norms = sum(
        leaf.size
        for leaf in jax.tree.leaves(params, is_leaf=weights.is_form)
        if not quant.is_quantized(leaf)
    )
    matrices = param_count(config) - norms
    # int8 values, one f16 scale per 32; the head's chunk padding is zero here (V=64).
    assert param_bytes(params) == matrices * (1 + 2 / 32) + norms * 4
    assert param_bytes(dense) == param_count(config) * 4


def test_vocab_chunks_pad_and_gather_like_the_dense_embedding():
    dense = np.random.default_rng(3).normal(size=(4100 * 2 + 7, 64)).astype(np.float32)
    rows = quant.quantize_blocks(dense, axis=-1)
    chunks = quant.to_vocab_chunks(rows, vocab_first=True)
    assert chunks.shape == dense.shape and chunks.chunks.shape[0] == 3
    ids = jnp.asarray([[0, 4095, 4096, 8206]])
    np.testing.assert_array_equal(weights.embed_rows(chunks, ids), dequantize(rows)[ids])
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 2, 64)), jnp.float32)
    np.testing.assert_allclose(
        weights.head_logits(x, weights.tied_head(chunks)),
        x @ dequantize(rows).T,
        atol=1e-4,
        rtol=1e-5,
    )


def test_sharded_quantized_forward_equals_unsharded(on_host_devices):
    out = on_host_devices(
        4,
        """
        import jax, numpy as np
        from scanlab import sharding
        from scanlab.decoder import forward, init_params, preset, quantize, shard_params
        config = preset("tiny").replace(head_dim=32)
        params = quantize(init_params(config, jax.random.PRNGKey(0)), config)
        tokens = np.random.default_rng(0).integers(0, 64, (4, 7))
        mesh = sharding.make_mesh("data=2,model=2")
        sharded = shard_params(params, config, mesh)
        gate = sharded.blocks.gate_proj
        print(tuple(gate.values.sharding.spec), tuple(gate.scales.sharding.spec))
        np.testing.assert_allclose(
            forward(sharded, tokens, config), forward(params, tokens, config), atol=1e-5
        )
        print("equal")
        """,
    )
    # The scales replicate the blocked axis (D / 32 entries) and shard the rest as the values.
    assert out.splitlines() == ["(None, 'data', 'model') (None, None, 'model')", "equal"]


def bad_scales(params):
    gate = params.blocks.gate_proj
    return params._replace(
        blocks=params.blocks._replace(
            gate_proj=dataclasses.replace(gate, scales=gate.scales[:, :, 1:])
        )
    )


def quantized_norm(params):
    norm = quant.quantize_blocks(np.asarray(params.final_norm), axis=-1)
    return params._replace(final_norm=norm)


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (bad_scales, ArgumentError, r"params\.blocks\.gate_proj\.scales has shape \(4, 2, 127\)"),
        (
            quantized_norm,
            ArgumentTypeError,
            r"params\.final_norm is a QuantArray, but only weight matrices may be",
        ),
    ],
    ids=["scales-shape", "quantized-norm"],
)
def test_a_bad_quantized_tree_is_named_before_tracing(damage, error, match):
    config = CONFIGS["llama"]
    params = damage(quantize(init_params(config, jax.random.PRNGKey(0)), config))
    with pytest.raises(error, match=match):
        forward(params, TOKENS, config)


def test_a_block_that_does_not_divide_an_input_width_is_named():
    config = preset("tiny")  # head_dim 16: out_proj's blocks of 32 do not fit
    with pytest.raises(
        ArgumentError, match="block size 32 does not divide the input width head_dim=16"
    ):
        quantize(init_params(config, jax.random.PRNGKey(0)), config)


def test_an_unknown_weights_name_is_refused():
    with pytest.raises(ArgumentError, match=r"weights must be one of \['quantized', 'float32'"):
        check_weights("q4_0")


def test_what_takes_dense_weights_names_the_quantized_leaf(tmp_path):
    from flax import nnx

    from scanlab.decoder import save_checkpoint
    from scanlab.nnx import NNXDecoder

    config = CONFIGS["llama"]
    params = quantize(init_params(config, jax.random.PRNGKey(0)), config)
    message = r"takes dense weights, got params\.embed as a QuantArray: load with weights='float32'"
    with pytest.raises(ArgumentTypeError, match="save_checkpoint " + message):
        save_checkpoint(tmp_path / "ckpt", config, params)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ArgumentTypeError, match="NNXDecoder " + message):
        NNXDecoder.from_params(params, config, nnx.Rngs(0))
