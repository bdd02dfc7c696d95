import jax
import numpy as np
import pytest

from scanlab.decoder import preset, spec
from scanlab.decoder.formats import base


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_declared_leaf_round_trips_through_the_transformers_layout(family):
    config = preset("tiny").replace(family=family, n_kv_heads=1)
    layer = spec.init_layer(config, jax.random.PRNGKey(1))
    declared = spec.declared(config).blocks
    for leaf, array in zip(
        jax.tree.leaves(declared, is_leaf=spec.is_leaf), jax.tree.leaves(layer), strict=True
    ):
        hf = base.to_hf(leaf, array, config)
        assert hf.shape == base.hf_shape(leaf, config)
        np.testing.assert_array_equal(base.from_hf(leaf, hf, config), array)


def test_a_layout_groups_letters_in_parentheses():
    assert base._groups("(K R Dh) D") == [["K", "R", "Dh"], ["D"]]
    assert base._groups("D (K R Dh)") == [["D"], ["K", "R", "Dh"]]
    assert base._groups("V D") == [["V"], ["D"]]
