import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanlab import checks


@settings(deadline=None, max_examples=50)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_seed_key_equals_prngkey(seed):
    np.testing.assert_array_equal(checks.seed_key(seed), np.asarray(jax.random.PRNGKey(seed)))


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        (-1, ValueError, r"seed must be in \[0, 2\*\*32\), got -1"),
        (2**32, ValueError, r"seed must be in \[0, 2\*\*32\), got 4294967296"),
        (1.5, TypeError, "seed must be an int, got 1.5 of type float"),
        ("3", TypeError, "seed must be an int, got '3' of type str"),
        (True, TypeError, "seed must be an int, got True of type bool"),
    ],
)
def test_seed_key_rejects(seed, error, match):
    with pytest.raises(error, match=match):
        checks.seed_key(seed)


def test_seed_key_rejects_traced_seed():
    with pytest.raises(TypeError, match="seed must be a Python int, got a traced value"):
        jax.jit(checks.seed_key)(3)


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)])
def test_static_int_accepts_integers(value):
    assert checks.static_int("T", value, minimum=0) == 3


def test_all_finite_names_first_bad_index():
    with pytest.raises(
        ValueError, match=r"x must be finite, got 2 NaN/Inf value\(s\), first at index \(1,\)"
    ):
        checks.all_finite("x", np.array([1.0, np.nan, np.inf]))


def test_numeric_array_passes_jax_arrays_through():
    x = jnp.ones(3)
    assert checks.numeric_array("x", x) is x


def test_messages_name_arguments_as_the_caller_spelled_them():
    spelling = {"max_new_tokens": "--max-new-tokens", "top_k": "--top-k", "temperature": "--temp"}
    with checks.spelled_as(spelling):
        with pytest.raises(ValueError, match=r"^--max-new-tokens must be >= 1, got 0$"):
            checks.static_int("max_new_tokens", 0, minimum=1)
        with pytest.raises(ValueError, match=r"^--top-k needs --temp > 0 .* got --top-k=3$"):
            checks.sampling_options(10, top_k=3)
        with pytest.raises(ValueError, match=r"^seed must be in"):  # not in the spelling: as is
            checks.seed_key(-1)
    with pytest.raises(ValueError, match=r"^max_new_tokens must be >= 1"):  # outside: Python's
        checks.static_int("max_new_tokens", 0, minimum=1)
