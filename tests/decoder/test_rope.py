import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from scanlab.decoder import rope
from scanlab.errors import ArgumentError

# Llama 3.2's rotary settings (1B and 3B), as its config.json states them.
LLAMA3_2_ROPE = dict(
    rope_type="llama3",
    rope_theta=500_000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
# Published settings: Llama 3.2 1B, Gemma 3 4B's global layers, Qwen2.5 / Qwen3 with YaRN as
# their model cards describe it, and a yarn with every option stated.
CASES = [
    (64, LLAMA3_2_ROPE["rope_theta"], LLAMA3_2_ROPE),
    (256, 1_000_000.0, dict(rope_type="linear", factor=8.0)),
    (128, 1_000_000.0, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)),
    (
        96,
        10_000.0,
        dict(
            rope_type="yarn",
            factor=16.0,
            original_max_position_embeddings=4096,
            beta_fast=16.0,
            beta_slow=2.0,
            attention_factor=1.5,
            truncate=False,
        ),
    ),
]


def _scaling(parameters: dict) -> rope.RopeScaling:
    settings = {k: v for k, v in parameters.items() if k not in ("rope_type", "rope_theta")}
    original = settings.pop("original_max_position_embeddings", None)
    return rope.RopeScaling(kind=parameters["rope_type"], original_max_seq_len=original, **settings)


@pytest.mark.parametrize(("head_dim", "theta", "parameters"), CASES)
def test_scaled_frequencies_and_factor_are_transformers_own(head_dim, theta, parameters):
    """Each scaling's frequencies within float32 rounding of transformers' (it computes them in
    float32, scanlab in float64 then rounds), and the same factor on cos and sin."""
    hf = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta, **parameters},
    )
    expected, expected_factor = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](hf, "cpu")
    scaling = _scaling(parameters)
    np.testing.assert_allclose(
        rope.inverse_frequencies(head_dim, theta, scaling), expected.numpy(), rtol=2e-6
    )
    assert rope.attention_factor(scaling) == pytest.approx(expected_factor, rel=1e-12)


def test_llama3_keeps_the_fast_pairs_and_divides_the_slow_ones():
    scaling = _scaling(CASES[0][2])
    plain = rope.inverse_frequencies(64, 500_000.0, None)
    scaled = rope.inverse_frequencies(64, 500_000.0, scaling)
    assert scaled[0] == plain[0]
    assert scaled[-1] == pytest.approx(plain[-1] / 32.0, rel=1e-12)


def test_factors_divide_each_pair_as_llama_cpp_stores_llama3():
    """llama.cpp's rope_freqs.weight holds the unscaled frequencies over the scaled ones:
    dividing by them gives llama3's frequencies back."""
    llama3 = _scaling(CASES[0][2])
    plain = rope.inverse_frequencies(64, 500_000.0, None)
    divisors = tuple(plain / rope.inverse_frequencies(64, 500_000.0, llama3))
    factors = rope.RopeScaling(kind="factors", factor=max(divisors), frequency_factors=divisors)
    np.testing.assert_allclose(
        rope.inverse_frequencies(64, 500_000.0, factors),
        rope.inverse_frequencies(64, 500_000.0, llama3),
        rtol=1e-15,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            dict(kind="dynamic", factor=2.0),
            "rope scaling must be one of ['linear', 'llama3', 'yarn', 'factors'], got 'dynamic'",
        ),
        (
            dict(kind="linear", factor=2.0, frequency_factors=(1.0, 2.0)),
            "frequency_factors must be positive and given for 'factors' rope scaling alone, "
            "got (1.0, 2.0) for 'linear'",
        ),
        (
            dict(kind="factors", factor=2.0),
            "frequency_factors must be positive and given for 'factors' rope scaling alone, "
            "got () for 'factors'",
        ),
        (dict(kind="linear", factor=0.0), "rope scaling factor must be > 0, got 0.0"),
        (
            dict(kind="llama3", factor=8.0),
            "llama3 rope scaling needs original_max_seq_len > 0, got None",
        ),
        (
            dict(kind="llama3", factor=8.0, original_max_seq_len=8192, high_freq_factor=1.0),
            "llama3 rope scaling needs high_freq_factor > low_freq_factor, got 1.0 and 1.0",
        ),
    ],
)
def test_bad_scalings_are_named(settings, message):
    with pytest.raises(ArgumentError) as error:
        rope.RopeScaling(**settings)
    assert str(error.value) == message
