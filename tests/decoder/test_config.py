import jax
import pytest

from scanlab.decoder import PRESETS, DecoderConfig, preset


def test_presets():
    llama2 = preset("llama2-7b")
    assert (llama2.n_layers, llama2.d_model, llama2.n_heads, llama2.head_dim, llama2.mlp_dim) == (
        32,
        4096,
        32,
        128,
        11008,
    )
    llama3 = preset("llama3-8b")
    assert (llama3.n_kv_heads, llama3.n_rep, llama3.vocab_size, llama3.rope_theta) == (
        8,
        4,
        128256,
        500000.0,
    )
    assert set(PRESETS) >= {"tiny", "llama2-7b", "llama3-8b"}


def test_config_is_hashable_for_jit():
    assert hash(preset("tiny")) == hash(preset("tiny").replace())
    jax.jit(lambda c: c.d_model, static_argnums=0)(preset("tiny"))


def test_unknown_preset():
    with pytest.raises(
        ValueError, match=r"preset must be one of \['llama2-7b', 'llama3-8b', 'tiny'\], got 'gpt'"
    ):
        preset("gpt")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            dict(n_heads=6, n_kv_heads=4),
            "n_heads must be a multiple of n_kv_heads, got n_heads=6, n_kv_heads=4",
        ),
        (dict(n_layers=0), "n_layers must be >= 1, got 0"),
        (dict(d_model=64.0), "d_model must be an int, got 64.0"),
        (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\), got 1.0"),
        (dict(rope_theta=0.0), "rope_theta must be > 0, got 0.0"),
        (dict(head_dim=15), r"head_dim must be even \(rotary embeddings rotate pairs\), got 15"),
        (
            dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
            "rope_scaling must be a RopeScaling or None, got dict",
        ),
        (
            dict(no_rope_layers=(1, 4)),
            r"no_rope_layers must be a tuple of layer indices in \[0, 4\), got \(1, 4\)",
        ),
        (
            dict(no_rope_layers=[3]),
            r"no_rope_layers must be a tuple of layer indices in \[0, 4\), got \[3\]",
        ),
    ],
)
def test_bad_config(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        preset("tiny").replace(**changes)


def test_keyword_only():
    with pytest.raises(TypeError):
        DecoderConfig(64, 2, 32, 4, 4, 8, 64)
