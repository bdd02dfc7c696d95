import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanlab.decoder import (
    Attention,
    DecoderBlock,
    check_params,
    init_params,
    layer_shapes,
    param_count,
    preset,
    spec,
    stack_layers,
    unstack_layers,
)

BLOG_STACKED = DecoderBlock(
    input_norm=(32, 4096),
    attention=Attention(
        q_proj=(32, 4096, 1, 32, 128),
        k_proj=(32, 4096, 32, 128),
        v_proj=(32, 4096, 32, 128),
        out_proj=(32, 1, 32, 128, 4096),
    ),
    mlp_norm=(32, 4096),
    gate_proj=(32, 4096, 11008),
    up_proj=(32, 4096, 11008),
    down_proj=(32, 11008, 4096),
)


def shapes(tree):
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def test_llama2_7b_matches_the_blog_listing_without_allocating():
    abstract = jax.eval_shape(lambda: init_params(preset("llama2-7b"), jax.random.PRNGKey(0)))
    assert shapes(abstract.blocks) == BLOG_STACKED
    assert layer_shapes(preset("llama2-7b")) == jax.tree.map(
        lambda s: s[1:], BLOG_STACKED, is_leaf=spec.is_shape
    )


def test_scan_body_sees_per_layer_slices():
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    seen = []
    jax.lax.scan(lambda c, layer: (seen.append(shapes(layer)) or c, None), 0, params.blocks)
    assert seen == [layer_shapes(config)]


def test_parameter_counts_of_the_published_models():
    assert param_count(preset("llama2-7b")) == 6_738_415_616
    assert param_count(preset("llama3-8b")) == 8_030_261_248


def test_stack_unstack_round_trip():
    blocks = init_params(preset("tiny"), jax.random.PRNGKey(0)).blocks
    layers = unstack_layers(blocks)
    assert len(layers) == 4
    jax.tree.map(np.testing.assert_array_equal, stack_layers(layers), blocks)


def test_layers_get_distinct_weights():
    q = init_params(preset("tiny"), jax.random.PRNGKey(0)).blocks.attention.q_proj
    assert not jnp.allclose(q[0], q[1])


def test_ragged_stack_is_rejected_naming_the_leaf():
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    ragged = params._replace(blocks=params.blocks._replace(gate_proj=params.blocks.gate_proj[:3]))
    with pytest.raises(
        ValueError,
        match=r"params\.blocks\.gate_proj has 3 layers on its leading axis, expected n_layers=4: shape \(3, 64, 128\), expected \(4, 64, 128\)",
    ):
        check_params(ragged, config)


def test_wrong_shape_is_rejected_naming_the_leaf():
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    attention = params.blocks.attention._replace(k_proj=jnp.zeros((4, 64, 4, 16)))
    bad = params._replace(blocks=params.blocks._replace(attention=attention))
    with pytest.raises(
        ValueError,
        match=r"params\.blocks\.attention\.k_proj has shape \(4, 64, 4, 16\), expected \(4, 64, 2, 16\)",
    ):
        check_params(bad, config)


def test_tied_embeddings_have_no_head():
    config = preset("tiny").replace(tie_embeddings=True)
    params = init_params(config, jax.random.PRNGKey(0))
    assert params.lm_head is None
    check_params(params, config)
    with pytest.raises(
        ValueError,
        match=r"params\.lm_head is not declared for this config \(set to None\), got an array",
    ):
        check_params(params._replace(lm_head=jnp.zeros((64, 64))), config)
    with pytest.raises(
        ValueError,
        match=r"params\.lm_head is missing: this config declares it with shape \(64, 64\)",
    ):
        check_params(params, config.replace(tie_embeddings=False))


def test_qwen2_declares_qkv_biases_and_llama_does_not():
    llama = preset("tiny")
    qwen2 = llama.replace(family="qwen2")
    attention = layer_shapes(qwen2).attention
    assert (attention.q_bias, attention.k_bias, attention.v_bias) == ((2, 2, 16), (2, 16), (2, 16))
    assert layer_shapes(llama).attention.q_bias is None
    # The biases are the whole difference: 3 leaves of R·K·Dh + 2·K·Dh = 128 per layer.
    assert param_count(qwen2) - param_count(llama) == 4 * 128
    biases = init_params(qwen2, jax.random.PRNGKey(0)).blocks.attention
    assert not np.asarray(biases.q_bias).any()  # transformers initialises biases at zero


def test_mesh_placement_follows_the_letters():
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    specs = spec.param_specs(preset("tiny").replace(family="qwen2"), mesh)
    assert specs.embed == P(None, "data")  # V D
    assert specs.blocks.attention.q_proj == P(None, "data", None, "model", None)  # L D R K Dh
    assert specs.blocks.attention.q_bias == P(None, None, "model", None)  # L R K Dh
    assert specs.blocks.down_proj == P(None, "model", "data")  # L F D
    assert specs.blocks.input_norm == P()  # norms are replicated
    assert specs.lm_head == P("data", None)  # D V
