"""scanlab.loops against the pure-Python twins in scanlab.reference, and against each other."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanlab import loops, reference

# Both sides run the same float32 operations; XLA's fusion may reorder a rounding or two.
RTOL, ATOL = 1e-5, 1e-6


class State(NamedTuple):
    h: jax.Array
    count: jax.Array


def assert_trees_close(ours, theirs, rtol=RTOL, atol=ATOL):
    ours_leaves, ours_def = jax.tree_util.tree_flatten(ours)
    theirs_leaves, theirs_def = jax.tree_util.tree_flatten(theirs)
    assert ours_def == theirs_def
    for mine, other in zip(ours_leaves, theirs_leaves, strict=True):
        assert np.shape(mine) == np.shape(other)
        assert np.asarray(mine).dtype == np.asarray(other).dtype
        np.testing.assert_allclose(mine, other, rtol=rtol, atol=atol)


def rnn_body(W):
    """A pytree carry (NamedTuple of a float and an int leaf), dict xs, tuple ys with None."""

    def body(state, x):
        h = jnp.tanh(state.h @ W + x["u"])
        return State(h, state.count + 1), (h.sum(), None, state.count)

    return body


def padded_batch(seed, T, B, H):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
    xs = {"u": rng.standard_normal((T, B, H)).astype(np.float32)}
    init = State(rng.standard_normal((B, H)).astype(np.float32), np.zeros(B, np.int32))
    lengths = rng.integers(0, T + 1, size=B)
    return W, xs, init, lengths


# --- masked_scan ---------------------------------------------------------------------------------


@settings(deadline=None, max_examples=15)
@given(
    T=st.integers(0, 6),
    B=st.integers(1, 4),
    H=st.integers(1, 3),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masked_scan_equals_its_reference(T, B, H, reverse, seed):
    W, xs, init, lengths = padded_batch(seed, T, B, H)
    ours = loops.masked_scan(rnn_body(W), init, xs, lengths, reverse=reverse)
    assert_trees_close(ours, reference.masked_scan(rnn_body(W), init, xs, lengths, reverse=reverse))


@pytest.mark.parametrize("reverse", [False, True])
def test_masked_scan_rows_equal_running_each_row_alone(reverse):
    W, xs, init, _ = padded_batch(0, 7, 4, 3)
    lengths = np.array([7, 0, 3, 1])
    carry, ys = loops.masked_scan(rnn_body(W), init, xs, lengths, reverse=reverse)
    for b, n in enumerate(lengths):
        row_init = jax.tree_util.tree_map(lambda leaf, b=b: leaf[b], init)
        row_xs = {"u": xs["u"][:n, b]}
        alone_carry, alone_ys = jax.lax.scan(rnn_body(W), row_init, row_xs, reverse=reverse)
        assert_trees_close(jax.tree_util.tree_map(lambda leaf, b=b: leaf[b], carry), alone_carry)
        assert_trees_close(jax.tree_util.tree_map(lambda y, b=b, n=n: y[:n, b], ys), alone_ys)
        # Past its length a row's outputs are zeros.
        for y in jax.tree_util.tree_leaves(ys):
            assert not np.asarray(y)[n:, b].any()


def test_masked_scan_reverse_starts_each_row_at_its_own_last_element():
    xs = np.arange(1, 6, dtype=np.float32)[:, None].repeat(2, axis=1)  # rows 1..5, padded
    _, ys = loops.masked_scan(
        lambda c, x: (c + x, c + x), np.zeros(2, np.float32), xs, [5, 3], reverse=True
    )
    # Row 1 has 3 real steps (1, 2, 3): a reverse cumulative sum over them, then zeros.
    np.testing.assert_array_equal(ys[:, 1], [6, 5, 3, 0, 0])
    np.testing.assert_array_equal(ys[:, 0], [15, 14, 12, 9, 5])


def test_masked_scan_gradients_equal_each_row_alone():
    W, xs, init, _ = padded_batch(1, 5, 3, 2)
    lengths = np.array([5, 2, 0])

    def masked_loss(W, u):
        carry, (total, _, _) = loops.masked_scan(rnn_body(W), init, {"u": u}, lengths, reverse=True)
        return (carry.h**2).sum() + total.sum()

    def rowwise_loss(W, u):
        loss = 0.0
        for b, n in enumerate(lengths):
            row_init = State(init.h[b], init.count[b])
            carry, (total, _, _) = jax.lax.scan(
                rnn_body(W), row_init, {"u": u[:n, b]}, reverse=True
            )
            loss += (carry.h**2).sum() + total.sum()
        return loss

    ours = jax.grad(masked_loss, argnums=(0, 1))(W, xs["u"])
    theirs = jax.grad(rowwise_loss, argnums=(0, 1))(W, xs["u"])
    assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours[1])[2:, 1].any()  # padding gets no gradient


def test_masked_scan_without_xs_runs_each_row_its_own_number_of_steps():
    carry, ys = loops.masked_scan(
        lambda c, _: (c * 2, c), np.ones(3, np.float32), None, [0, 1, 4], length=4
    )
    np.testing.assert_array_equal(carry, [1, 2, 16])
    assert ys.shape == (4, 3)


def test_masked_scan_under_jit_with_traced_lengths():
    W, xs, init, lengths = padded_batch(2, 4, 3, 2)
    jitted = jax.jit(lambda lengths: loops.masked_scan(rnn_body(W), init, xs, lengths))
    assert_trees_close(jitted(lengths), reference.masked_scan(rnn_body(W), init, xs, lengths))


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        ([1, 2], ValueError, r"lengths must have shape \(3,\) \(one per row\), got shape \(2,\)"),
        ([1, 2, 5], ValueError, r"lengths must be in \[0, T\] = \[0, 4\], got lengths\[2\] = 5"),
        ([-1, 2, 3], ValueError, r"got lengths\[0\] = -1"),
        ([1.0, 2.0, 3.0], TypeError, "lengths must hold integers, got dtype float64"),
    ],
)
def test_masked_scan_rejects_bad_lengths(lengths, error, match):
    W, xs, init, _ = padded_batch(0, 4, 3, 2)
    with pytest.raises(error, match=match):
        loops.masked_scan(rnn_body(W), init, xs, lengths)


@pytest.mark.parametrize("reverse", [False, True])
def test_traced_lengths_beyond_t_are_clamped_to_t(reverse):
    """Traced lengths cannot be checked up front; past T they run as T (in both directions)."""
    W, xs, init, _ = padded_batch(1, 4, 3, 2)
    jitted = jax.jit(
        lambda lengths: loops.masked_scan(rnn_body(W), init, xs, lengths, reverse=reverse)
    )
    beyond, clamped = np.array([7, 4, -2]), np.array([4, 4, 0])
    expected = reference.masked_scan(rnn_body(W), init, xs, clamped, reverse=reverse)
    assert_trees_close(jitted(beyond), expected)


def test_masked_scan_rejects_xs_of_another_batch_size():
    W, xs, init, lengths = padded_batch(0, 4, 3, 2)
    with pytest.raises(
        ValueError,
        match=r"xs must have init's batch size on axis 1 \(T, B, \.\.\.\): init has B=3, xs has 2",
    ):
        loops.masked_scan(rnn_body(W), init, jax.tree.map(lambda x: x[:, :2], xs), lengths)


def test_masked_scan_rejects_rows_that_disagree():
    W, xs, init, lengths = padded_batch(0, 4, 3, 2)
    with pytest.raises(ValueError, match=r"xs leaves disagree on the size of axis 0"):
        loops.masked_scan(rnn_body(W), init, {"u": xs["u"], "v": xs["u"][:2]}, lengths)


# --- the carry check shared by every loop, before anything runs ----------------------------------


def counting(fn):
    calls = []

    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped, calls


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            lambda s, x: (State(s.h.astype(jnp.bfloat16), s.count), None),
            r"changed the carry's dtype: carry\.h has dtype float32 in and bfloat16 out",
        ),
        (
            lambda s, x: (State(jnp.concatenate([s.h, s.h]), s.count), None),
            r"changed the carry's shape: carry\.h has shape \(2,\) in and \(4,\) out",
        ),
        (lambda s, x: ((s.h, s.count), None), r"must return a carry with the structure"),
        (lambda s, x: s.h, r"body must return a pair \(carry, y\), got an array float32\[2\]"),
    ],
)
def test_loops_reject_a_body_that_changes_its_carry_naming_the_leaf(body, match):
    _, xs, init, lengths = padded_batch(0, 3, 2, 2)
    with pytest.raises(TypeError, match=match):
        loops.masked_scan(body, init, xs, lengths)
    row_init = jax.tree_util.tree_map(lambda leaf: leaf[0], init)
    with pytest.raises(TypeError, match=match):
        loops.remat_scan(body, row_init, {"u": xs["u"][:, 0]})


def test_the_carry_check_runs_before_any_step():
    effects = []

    def body(c, x):
        jax.debug.callback(lambda: effects.append(1))
        return c.astype(jnp.float16), None

    with pytest.raises(TypeError, match="dtype float32 in and float16 out"):
        loops.remat_scan(body, np.zeros(2, np.float32), np.zeros((3, 2), np.float32))
    assert effects == []


def test_bounded_while_rejects_a_body_that_changes_its_carry():
    with pytest.raises(TypeError, match=r"carry\[1\] has dtype int32 in and float32 out"):
        loops.bounded_while(
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1, c[1].astype(jnp.float32)),
            (jnp.int32(0), jnp.int32(4)),
            5,
        )
    with pytest.raises(TypeError, match="cond must return a bool scalar"):
        loops.bounded_while(lambda c: c, lambda c: c + 1, jnp.zeros(2), 5)
    with pytest.raises(ValueError, match="max_steps must be >= 0, got -1"):
        loops.bounded_while(lambda c: c < 1, lambda c: c + 1, jnp.float32(0), -1)


# --- bounded_while -------------------------------------------------------------------------------


def newton_sqrt(target):
    """Newton's iteration for sqrt(target) until the step is below 1e-4."""

    def cond(state):
        x, previous = state
        return jnp.abs(x - previous) > 1e-4

    def body(state):
        x, _ = state
        return x - (x * x - target) / (2 * x), x

    return cond, body


@settings(deadline=None, max_examples=20)
@given(target=st.floats(0.5, 50.0, width=32), max_steps=st.integers(0, 12))
def test_bounded_while_equals_its_reference(target, max_steps):
    cond, body = newton_sqrt(np.float32(target))
    init = (np.float32(target), np.float32(0.0))
    ours = loops.bounded_while(cond, body, init, max_steps)
    theirs = reference.bounded_while(cond, body, init, max_steps)
    # The compiled body and the eager one round differently in the last f32 place (XLA fuses
    # the update), and Newton's first steps amplify that: 1.8e-5 relative seen at 7 of ~9 steps.
    assert_trees_close(ours[0], theirs[0], rtol=1e-4)
    assert int(ours[1]) == theirs[1] <= max_steps


def test_bounded_while_stops_early_and_differentiates_like_the_unrolled_loop():
    def solve(target):
        cond, body = newton_sqrt(target)
        return loops.bounded_while(cond, body, (target, jnp.float32(0.0)), 50)

    (root, _), steps = solve(jnp.float32(9.0))
    assert 0 < int(steps) < 50
    np.testing.assert_allclose(root, 3.0, rtol=1e-6)

    def unrolled(target):
        cond, body = newton_sqrt(target)
        state = (target, jnp.float32(0.0))
        for _ in range(50):
            if not cond(state):
                break
            state = body(state)
        return state[0]

    ours = jax.grad(lambda t: solve(t)[0][0])(jnp.float32(9.0))
    theirs = jax.grad(unrolled)(jnp.float32(9.0))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_allclose(ours, 1 / 6, rtol=1e-4)  # d sqrt(t)/dt at t = 9
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(lambda t: jax.lax.while_loop(*newton_sqrt(t), (t, jnp.float32(0.0)))[0])(9.0)


def test_bounded_while_stops_at_max_steps():
    carry, steps = loops.bounded_while(lambda c: c < 100, lambda c: c + 1, jnp.int32(0), 7)
    assert (int(carry), int(steps)) == (7, 7)
    carry, steps = loops.bounded_while(lambda c: c < 100, lambda c: c + 1, jnp.int32(0), 0)
    assert (int(carry), int(steps)) == (0, 0)


# --- remat_scan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(loops.REMAT_POLICIES))
@pytest.mark.parametrize("segments", [1, 4, "sqrt"])
def test_remat_scan_values_and_gradients_equal_the_plain_scan(policy, segments):
    W, xs, init, _ = padded_batch(3, 16, 1, 4)
    row_init = State(init.h[0], init.count[0])
    row_xs = {"u": xs["u"][:, 0]}

    def loss(W, scan):
        carry, (total, _, _) = scan(rnn_body(W), row_init, row_xs)
        return (carry.h**2).sum() + total.sum()

    def remat(f, init, xs):
        return loops.remat_scan(f, init, xs, policy=policy, segments=segments)

    assert_trees_close(
        remat(rnn_body(W), row_init, row_xs), reference.scan(rnn_body(W), row_init, row_xs)
    )
    # Recomputation replays the same float32 operations: gradients agree to rounding.
    np.testing.assert_allclose(
        jax.grad(loss)(W, remat), jax.grad(loss)(W, jax.lax.scan), rtol=1e-6, atol=1e-6
    )


def test_nested_segments_bound_the_gradients_memory():
    W = jnp.eye(8, dtype=jnp.float32) * 0.5

    def temp_bytes(T, segments):
        def loss(h):
            return loops.remat_scan(
                lambda h, _: (jnp.tanh(h @ W), None), h, length=T, policy="full", segments=segments
            )[0].sum()

        compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((4, 8))).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # O(T) without nesting: 16× the steps, about 16× the memory; O(√T) nested: about 4×.
    assert temp_bytes(4096, 1) > 8 * temp_bytes(256, 1)
    assert temp_bytes(4096, "sqrt") < 6 * temp_bytes(256, "sqrt")
    assert temp_bytes(4096, "sqrt") < temp_bytes(4096, 1) / 10


def test_sqrt_segments_is_the_divisor_nearest_the_root():
    assert [loops.sqrt_segments(T) for T in (0, 1, 7, 16, 1000, 10_000, 100_000)] == [
        1,
        1,
        1,
        4,
        25,
        100,
        250,
    ]


def test_remat_scan_rejects_bad_options():
    body = lambda c, x: (c + x, None)  # noqa: E731
    xs = np.ones((10, 2), np.float32)
    with pytest.raises(ValueError, match=r"policy must be one of \['dots', 'dots_no_batch'"):
        loops.remat_scan(body, np.zeros(2, np.float32), xs, policy="everything")
    with pytest.raises(ValueError, match="segments must divide T = 10, got 3; try segments=2"):
        loops.remat_scan(body, np.zeros(2, np.float32), xs, segments=3)
    with pytest.raises(ValueError, match="length must equal the xs time axis, 10, got 4"):
        loops.remat_scan(body, np.zeros(2, np.float32), xs, length=4)


# --- linear_scan ---------------------------------------------------------------------------------


def linear_inputs(seed, T, D, complex_):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (T, D)).astype(np.float32)
    b = rng.standard_normal((T, D)).astype(np.float32)
    h0 = rng.standard_normal(D).astype(np.float32)
    if complex_:
        phase = rng.uniform(0, 2 * np.pi, (T, D))
        a, b, h0 = (
            (a * np.exp(1j * phase)).astype(np.complex64),
            (b + 1j * b[::-1]).astype(np.complex64),
            (h0 - 1j).astype(np.complex64),
        )
    return a, b, h0


# A few shapes, many values: each new shape costs a compile of both methods (one jit, where
# eager dispatch would compile the associative scan's slices one by one).
jitted_linear_scan = jax.jit(loops.linear_scan, static_argnames="method")


@settings(deadline=None, max_examples=20)
@given(
    T=st.sampled_from([1, 7, 33]),
    D=st.sampled_from([1, 3]),
    complex_=st.booleans(),
    with_h0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_scan_methods_equal_the_reference(T, D, complex_, with_h0, seed):
    a, b, h0 = linear_inputs(seed, T, D, complex_)
    h0 = h0 if with_h0 else None
    expected = reference.linear_scan(a, b, h0)
    for method in ("scan", "associative"):  # "auto" is one of them: see linear_method's test
        got = jitted_linear_scan(a, b, h0, method=method)
        assert got.dtype == expected.dtype
        # |a| < 1: states stay O(1); the associative order of products differs in rounding only.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("complex_", [False, True])
def test_linear_scan_gradients_equal_between_methods(complex_):
    a, b, h0 = linear_inputs(5, 16, 3, complex_)

    def loss(method):
        def f(a, b, h0):
            h = loops.linear_scan(a, b, h0, method=method)
            return jnp.sum(jnp.abs(h) ** 2)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(a, b, h0)

    assert_trees_close(loss("associative"), loss("scan"), rtol=1e-4, atol=1e-5)


def test_linear_scan_auto_picks_the_measured_winner_on_this_backend():
    threshold = loops.ASSOCIATIVE_FROM_T[jax.default_backend()]
    for T in (16, 4096):
        expected = "associative" if threshold is not None and T >= threshold else "scan"
        assert loops.linear_method("auto", T) == expected


@pytest.mark.parametrize(
    ("a", "b", "h0", "match"),
    [
        (
            np.ones((4, 2), np.float32),
            np.ones((4, 3), np.float32),
            None,
            r"a and b must have one shape and dtype \(T, \.\.\.\), got a float32\[4, 2\] and b float32\[4, 3\]",
        ),
        (
            np.ones((4, 2), np.int32),
            np.ones((4, 2), np.int32),
            None,
            "real or complex floats, got dtype int32",
        ),
        (
            np.ones((4, 2), np.float32),
            np.ones((4, 2), np.float32),
            np.ones(3, np.float32),
            r"h0 must have shape a.shape\[1:\] = \(2,\) and dtype float32, got float32\[3\]",
        ),
        (np.float32(1), np.float32(1), None, "a must have shape \\(T, ...\\), got a 0-d value"),
    ],
)
def test_linear_scan_rejects_bad_input(a, b, h0, match):
    with pytest.raises((ValueError, TypeError), match=match):
        loops.linear_scan(a, b, h0)


def test_linear_scan_of_no_steps_has_no_states():
    a = np.ones((0, 3), np.float32)
    for method in ("scan", "associative"):
        assert loops.linear_scan(a, a, np.zeros(3, np.float32), method=method).shape == (0, 3)


def test_linear_scan_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method must be 'auto', 'scan' or 'associative'"):
        loops.linear_scan(np.ones((2, 1), np.float32), np.ones((2, 1), np.float32), method="fast")
