import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.traces import traced

from scanlab import LaxScanModule, NNScanModule, lax_scan_in_module
from scanlab.recurrence import _weights

# float32 rounding, accumulated over up to a few hundred tanh steps.
RTOL, ATOL = 1e-5, 1e-6


class SeedLaxScanModule(nn.Module):
    """The seed document's code, verbatim: the original every scanlab version is checked against."""

    hidden: int
    T: int

    @nn.compact
    def __call__(self, x):
        H = self.hidden
        W = self.param("W", nn.initializers.lecun_normal(), (H, H))
        init_carry = jnp.tanh(x @ W)

        def body(carry, _):
            new_carry = jnp.tanh(carry @ W)
            return new_carry, None

        final, _ = jax.lax.scan(body, init_carry, jnp.arange(self.T))
        return final


def textbook(seed, x, hidden, T):
    model = SeedLaxScanModule(hidden=hidden, T=T)
    variables = model.init(jax.random.PRNGKey(seed), x)
    return model.apply(variables, x)


def _x(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed + 1000), shape)


@pytest.mark.parametrize(
    ("hidden", "T"),
    [(1, 0), (1, 1), (1, 300), (8, 0), (8, 1), (8, 500), (256, 0), (256, 1), (256, 50)],
)
def test_equals_textbook(hidden, T):
    x = _x((hidden,))
    out = lax_scan_in_module(7, x, hidden, T)
    assert out.shape == (hidden,)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, textbook(7, x, hidden, T), rtol=RTOL, atol=ATOL)


def test_T0_returns_init_carry():
    x = _x((5,))
    W = SeedLaxScanModule(5, 0).init(jax.random.PRNGKey(3), x)["params"]["W"]
    np.testing.assert_allclose(lax_scan_in_module(3, x, 5, 0), jnp.tanh(x @ W), rtol=RTOL)


@pytest.mark.parametrize(
    "x", [[1.0, 2.0, 3.0], (1, 2, 3), np.array([1.0, 2.0, 3.0]), jnp.array([1.0, 2.0, 3.0])]
)
def test_accepts_lists_numpy_and_jax(x):
    expected = textbook(0, jnp.asarray(x, jnp.float32), 3, 4)
    np.testing.assert_allclose(lax_scan_in_module(0, x, 3, 4), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch", [(2,), (3, 2)])
def test_leading_batch_axes_match_per_row(batch):
    x = _x((*batch, 6))
    out = lax_scan_in_module(1, x, 6, 20)
    assert out.shape == (*batch, 6)
    rows = x.reshape(-1, 6)
    per_row = jnp.stack([lax_scan_in_module(1, row, 6, 20) for row in rows])
    np.testing.assert_allclose(out.reshape(-1, 6), per_row, rtol=RTOL, atol=ATOL)


def test_trajectory_holds_every_state():
    x = _x((4,))
    states = lax_scan_in_module(2, x, 4, 6, trajectory=True)
    assert states.shape == (7, 4)
    for t in range(7):
        np.testing.assert_allclose(states[t], textbook(2, x, 4, t), rtol=RTOL, atol=ATOL)


def test_repeated_calls_do_not_retrace():
    x = np.ones((3, 5), np.float32)
    lax_scan_in_module(0, x, 5, 11)
    with traced() as traces:
        for seed in range(20):  # more seeds than the weight cache holds: inits re-run, not re-trace
            lax_scan_in_module(seed, x + seed, 5, 11)
    assert (traces["_apply"], traces["_init_weights"]) == (0, 0)
    with traced() as traces:
        lax_scan_in_module(0, x, 5, 12)  # a new T is a new static signature for apply only
    assert (traces["_apply"], traces["_init_weights"]) == (1, 0)


def test_weights_are_cached_per_seed_and_hidden():
    _weights.cache_clear()
    lax_scan_in_module(3, np.ones(6), 6, 2)
    lax_scan_in_module(3, np.ones((4, 6)), 6, 9)  # same (seed, hidden): W reused
    assert _weights.cache_info().hits == 1
    for seed in (3, 4):  # a different seed still gives the textbook's W for that seed
        np.testing.assert_allclose(
            lax_scan_in_module(seed, np.ones(6), 6, 5),
            textbook(seed, jnp.ones(6), 6, 5),
            rtol=RTOL,
            atol=ATOL,
        )


def test_gradient_matches_textbook():
    x = _x((6,))
    ours = jax.grad(lambda x: lax_scan_in_module(4, x, 6, 30).sum())(x)
    theirs = jax.grad(lambda x: textbook(4, x, 6, 30).sum())(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_traced_x_under_jit():
    _weights.cache_clear()  # the first call for this seed happens while tracing
    x = _x((6,))
    jitted = jax.jit(lambda x: lax_scan_in_module(4, x, 6, 30))
    np.testing.assert_allclose(jitted(x), textbook(4, x, 6, 30), rtol=RTOL, atol=ATOL)
    # and the cached W is a concrete array, usable outside that trace
    np.testing.assert_allclose(
        lax_scan_in_module(4, x, 6, 30), textbook(4, x, 6, 30), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("trajectory", [False, True])
def test_nn_scan_twin_same_params_same_numbers(trajectory):
    x = _x((2, 8))
    scan_module = LaxScanModule(8, 40, trajectory)
    twin = NNScanModule(8, 40, trajectory)
    variables = scan_module.init(jax.random.PRNGKey(5), x)
    twin_variables = twin.init(jax.random.PRNGKey(5), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, twin_variables)
    chex.assert_trees_all_close(variables, twin_variables, rtol=0, atol=0)
    np.testing.assert_allclose(
        twin.apply(variables, x), scan_module.apply(variables, x), rtol=1e-6, atol=1e-7
    )


def test_x64_gives_the_same_W(tmp_path):
    """W's dtype is pinned, so enabling x64 (in a fresh process) draws the same weights."""
    code = (
        "import jax, numpy as np; from scanlab import LaxScanModule;"
        "v = LaxScanModule(16, 2).init(jax.random.PRNGKey(9), np.ones(16, np.float32));"
        "w = v['params']['W']; assert w.dtype == np.float32, w.dtype;"
        "np.save('W.npy', np.asarray(w))"
    )
    x64 = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JAX_ENABLE_X64": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert x64.returncode == 0, x64.stderr
    W_x64 = np.load(tmp_path / "W.npy")
    W = LaxScanModule(16, 2).init(jax.random.PRNGKey(9), np.ones(16, np.float32))["params"]["W"]
    np.testing.assert_array_equal(W_x64, np.asarray(W))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(x=np.ones(3)),
            ValueError,
            r"x must have shape \(\.\.\., hidden\) = \(\.\.\., 4\), got shape \(3,\)",
        ),
        (dict(x=np.float32(1.0)), ValueError, r"x must have shape .* got a 0-d value"),
        (dict(hidden=0, x=np.ones(0)), ValueError, "hidden must be >= 1, got 0"),
        (dict(T=-1), ValueError, "T must be >= 0, got -1"),
        (dict(T=2.5), TypeError, "T must be an int, got 2.5 of type float"),
        (dict(T="3"), TypeError, "T must be an int, got '3' of type str"),
        (dict(T=True), TypeError, "T must be an int, got True of type bool"),
        (dict(hidden=4.0), TypeError, "hidden must be an int, got 4.0 of type float"),
        (dict(seed=-3), ValueError, r"seed must be in \[0, 2\*\*32\), got -3"),
        (dict(seed=2**40), ValueError, r"seed must be in \[0, 2\*\*32\)"),
        (dict(seed="0"), TypeError, "seed must be an int, got '0' of type str"),
        (dict(x=["a", "b", "c", "d"]), TypeError, "x must hold real numbers .* got dtype <U1"),
        (dict(x=np.ones(4, bool)), TypeError, "x must hold real numbers .* got dtype bool"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs, error, match):
    args = dict(seed=0, x=np.ones(4, np.float32), hidden=4, T=3) | kwargs
    with pytest.raises(error, match=match):
        lax_scan_in_module(args["seed"], args["x"], args["hidden"], args["T"])


def test_traced_T_is_rejected_with_the_fix():
    with pytest.raises(
        TypeError, match=r"T must be a static Python int, got a traced value.*static_argnames='T'"
    ):
        jax.jit(lambda T: lax_scan_in_module(0, np.ones(4), 4, T))(3)


def test_check_finite():
    x = np.array([1.0, np.inf, 0.0, 0.0])
    with pytest.raises(
        ValueError, match=r"x must be finite, got 1 NaN/Inf value\(s\), first at index \(1,\)"
    ):
        lax_scan_in_module(0, x, 4, 3, check_finite=True)
    assert np.isnan(lax_scan_in_module(0, x * np.nan, 4, 3)).all()  # unchecked: NaN flows through


@pytest.mark.parametrize("trajectory", [False, True])
def test_seq_lengths_equal_running_each_row_alone(trajectory):
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    seq_lengths = np.array([[0, 5, 2], [9, 1, 9]])
    out = lax_scan_in_module(0, x, 8, 9, trajectory=trajectory, seq_lengths=seq_lengths)
    for index in np.ndindex(2, 3):
        n = int(seq_lengths[index])
        alone = lax_scan_in_module(0, x[index], 8, n, trajectory=trajectory)
        if trajectory:
            # Every state up to the row's length (tanh(x @ W) included), then zeros.
            np.testing.assert_allclose(out[(slice(0, n + 1), *index)], alone, rtol=1e-6, atol=1e-6)
            assert not np.asarray(out[(slice(n + 1, None), *index)]).any()
        else:
            np.testing.assert_allclose(out[index], alone, rtol=1e-6, atol=1e-6)


def test_seq_lengths_on_the_module_and_under_jit():
    x = np.ones((3, 4), np.float32)
    module = LaxScanModule(4, 6)
    variables = module.init(jax.random.PRNGKey(0), x)
    lengths = np.array([6, 0, 3])
    out = jax.jit(module.apply)(variables, x, lengths)
    for b, n in enumerate(lengths):
        alone = LaxScanModule(4, int(n)).apply(variables, x[b])
        np.testing.assert_allclose(out[b], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("seq_lengths", "error", "match"),
    [
        (
            np.array([1, 2]),
            ValueError,
            r"seq_lengths must have shape \(3,\) \(one per row\), got shape \(2,\)",
        ),
        (
            np.array([1, 2, 4]),
            ValueError,
            r"seq_lengths must be in \[0, T\] = \[0, 3\], got seq_lengths\[2\] = 4",
        ),
        (np.array([1.0, 2.0, 3.0]), TypeError, "seq_lengths must hold integers, got dtype float64"),
    ],
)
def test_bad_seq_lengths_are_rejected(seq_lengths, error, match):
    with pytest.raises(error, match=match):
        lax_scan_in_module(0, np.ones((3, 4), np.float32), 4, 3, seq_lengths=seq_lengths)
