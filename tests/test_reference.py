"""reference.scan against jax.lax.scan: same values, same dtypes, same structure, same rejections."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanlab import reference

# Both sides run the same float32 operations; only XLA's fusion may reorder a rounding.
RTOL, ATOL = 1e-6, 1e-6


class Pair(NamedTuple):
    a: np.ndarray
    b: np.ndarray


def assert_same_result(ours, theirs):
    ours_leaves, ours_def = jax.tree_util.tree_flatten(ours)
    theirs_leaves, theirs_def = jax.tree_util.tree_flatten(theirs)
    assert ours_def == theirs_def
    for mine, jaxs in zip(ours_leaves, theirs_leaves, strict=True):
        jaxs = jnp.asarray(jaxs)  # jax.lax.scan may forward a Python-number init unchanged
        assert np.shape(mine) == jaxs.shape
        assert np.asarray(mine).dtype == jaxs.dtype
        np.testing.assert_allclose(mine, jaxs, rtol=RTOL, atol=ATOL)


def both(f, init, xs=None, **kwargs):
    ours = reference.scan(f, init, xs, **kwargs)
    jax_xs = jax.tree_util.tree_map(jnp.asarray, xs)
    theirs = jax.lax.scan(f, init, jax_xs, **kwargs)
    assert_same_result(ours, theirs)
    return ours


# Bodies that type-check for the xs / init built below; each exercises a different feature.
def leaky_sum(carry, x):
    return carry * 0.5 + x["v"].sum(), {"sq": x["v"] * x["v"], "none": None}


def counter(carry, x):
    count, total = carry
    return (count + 1, total + x.a * x.b), (count, x.a.astype(jnp.int32))


def tuple_out(carry, x):
    return carry + 1.0, (carry * 2, None, carry > 1.0)


leading = st.integers(min_value=0, max_value=5)
tail = st.lists(st.integers(min_value=1, max_value=3), max_size=2).map(tuple)


@settings(deadline=None, max_examples=20)
@given(n=leading, shape=tail, reverse=st.booleans(), data=st.data())
def test_dict_xs_with_none_outputs(n, shape, reverse, data):
    v = data.draw(
        st.lists(
            st.floats(-3, 3, width=32),
            min_size=n * int(np.prod(shape)),
            max_size=n * int(np.prod(shape)),
        )
    )
    xs = {"v": np.array(v, np.float32).reshape(n, *shape)}
    init = data.draw(st.sampled_from([0.0, np.float32(1.5), np.zeros((), np.float32)]))
    both(leaky_sum, init, xs, reverse=reverse)


@settings(deadline=None, max_examples=20)
@given(n=leading, reverse=st.booleans(), python_count=st.booleans())
def test_namedtuple_xs_tuple_carry_weak_types(n, reverse, python_count):
    rng = np.random.default_rng(n)
    xs = Pair(
        rng.standard_normal((n, 2)).astype(np.float32),
        rng.standard_normal(n).astype(np.float32)[:, None],
    )
    count = 0 if python_count else np.int32(0)
    both(counter, (count, np.zeros(2, np.float32)), xs, reverse=reverse)


@settings(deadline=None, max_examples=10)
@given(length=st.integers(min_value=0, max_value=6), reverse=st.booleans())
def test_no_xs_with_length(length, reverse):
    both(tuple_out, np.float32(0.0), None, length=length, reverse=reverse)


def test_blog_example_as_array():
    carry, ys = both(lambda x, y: (x + y, y + 2), 0, np.array([1, 2, 3]))
    assert carry.item() == 6 and ys.tolist() == [3, 4, 5]


def test_reverse_keeps_ys_in_index_order():
    carry, ys = both(lambda c, x: (c * 10 + x, c), 0, np.arange(3), reverse=True)
    assert carry.item() == 210 and ys.tolist() == [21, 2, 0]


def test_weak_init_is_promoted_to_the_body_type():
    carry, ys = both(lambda c, x: (c + 1.5, c), 0, None, length=2)
    assert carry.dtype == np.float32 and ys.tolist() == [0.0, 1.5]


def test_zero_length_outputs_take_their_type_from_the_body():
    _carry, ys = both(lambda c, x: (c + 1.5, (c, x * 2)), 0, np.zeros((0, 3), np.int32))
    assert ys[0].shape == (0,) and ys[1].shape == (0, 3) and ys[1].dtype == np.int32


def test_unroll_is_accepted():
    both(lambda c, x: (c + x, None), 0, np.arange(5), unroll=3)
    with pytest.raises(ValueError, match="unroll must be a bool or an int >= 1, got 0"):
        reference.scan(lambda c, x: (c + x, None), 0, np.arange(5), unroll=0)


def rejects_like_jax(error, match, f, init, xs=None, **kwargs):
    with pytest.raises(error, match=match):
        reference.scan(f, init, xs, **kwargs)
    with pytest.raises(error):
        jax.lax.scan(f, init, xs, **kwargs)


def test_rejects_python_list_with_the_fix():
    rejects_like_jax(
        ValueError,
        r"no leading axis to scan over: xs\[0\] has shape \(\).*pass an array instead",
        lambda x, y: (x + y, y + 2),
        0,
        [1, 2, 3],
    )


def test_rejects_length_disagreeing_with_leading_axis():
    rejects_like_jax(
        ValueError,
        "`length` argument of 4 which disagrees with leading axis sizes 3",
        lambda c, x: (c, None),
        0,
        np.arange(3),
        length=4,
    )


def test_rejects_leaves_of_different_lengths():
    rejects_like_jax(
        ValueError,
        r"different leading axis sizes: xs\['a'\]: 3, xs\['b'\]: 4",
        lambda c, x: (c, None),
        0,
        {"a": np.arange(3), "b": np.arange(4)},
    )


def test_rejects_no_xs_and_no_length():
    rejects_like_jax(
        ValueError,
        "no values to scan over and `length` not provided",
        lambda c, x: (c, None),
        0,
        None,
    )


def test_rejects_body_that_returns_the_carry_alone():
    rejects_like_jax(
        TypeError,
        r"must be a pair \(carry, y\).*return `new_carry, None`",
        lambda c, x: c + x,
        0,
        np.arange(3),
    )


def test_rejects_carry_structure_change():
    rejects_like_jax(
        TypeError, "same pytree structure", lambda c, x: ((c, c), None), 0, np.arange(3)
    )


def test_rejects_carry_shape_change_naming_the_leaf():
    rejects_like_jax(
        TypeError,
        r"carry\['h'\] has shape \(2,\) in and \(4,\) out",
        lambda c, x: ({"h": jnp.concatenate([c["h"], c["h"]])}, None),
        {"h": np.zeros(2, np.float32)},
        np.arange(3),
    )


def test_rejects_carry_dtype_change_of_a_strong_type():
    # int8 + int32 is an implicit promotion: allowed here, so that scan's own check is reached.
    with jax.numpy_dtype_promotion("standard"):
        rejects_like_jax(
            TypeError,
            r"carry has dtype int8 in and int32 out",
            lambda c, x: (c + x, None),
            np.int8(0),
            np.arange(3, dtype=np.int32),
        )


def test_rejects_negative_length_where_jax_returns_init():
    with pytest.raises(ValueError, match="length must be an int >= 0, got -1"):
        reference.scan(lambda c, x: (c, None), 0, None, length=-1)
