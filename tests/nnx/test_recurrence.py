"""The four forms of the recurrence (linen / NNX × raw lax.scan / lifted scan) on one W."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.traces import traced

from scanlab import LaxScanModule, NNScanModule
from scanlab.nnx.recurrence import (
    NNXLaxScanModule,
    NNXScanModule,
    from_linen,
    nnx_lax_scan_in_module,
    to_linen,
)

# The four forms run the same float32 ops on the same W; only XLA's fusion could differ.
RTOL, ATOL = 1e-6, 1e-6

X = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


def four_forms(variables, T, trajectory):
    """name -> (x -> output), each form holding the W of `variables`."""
    return {
        "linen lax.scan": lambda x: LaxScanModule(8, T, trajectory).apply(variables, x),
        "linen nn.scan": lambda x: NNScanModule(8, T, trajectory).apply(variables, x),
        "nnx lax.scan": from_linen(variables, T, trajectory=trajectory),
        "nnx nnx.scan": from_linen(variables, T, cls=NNXScanModule, trajectory=trajectory),
    }


@pytest.mark.parametrize("T", [0, 1, 40])
@pytest.mark.parametrize("trajectory", [False, True])
def test_four_forms_give_the_same_numbers(T, trajectory):
    variables = LaxScanModule(8, T).init(jax.random.PRNGKey(3), X)
    outputs = {name: form(X) for name, form in four_forms(variables, T, trajectory).items()}
    expected = outputs.pop("linen lax.scan")
    assert expected.shape == ((T + 1, 3, 8) if trajectory else (3, 8))
    for name, out in outputs.items():
        np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def test_four_forms_give_the_same_gradients():
    variables = LaxScanModule(8, 25).init(jax.random.PRNGKey(4), X)

    def linen_grad(cls):
        loss = lambda params: (cls(8, 25).apply({"params": params}, X) ** 2).sum()  # noqa: E731
        return jax.grad(loss)(variables["params"])["W"]

    def nnx_grad(cls):
        module = from_linen(variables, 25, cls=cls)
        grads = nnx.grad(lambda m: (m(X) ** 2).sum())(module)
        return grads.W[...]

    expected = linen_grad(LaxScanModule)
    for got in (linen_grad(NNScanModule), nnx_grad(NNXLaxScanModule), nnx_grad(NNXScanModule)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_linen_conversion_round_trips():
    module = NNXLaxScanModule(8, 10, rngs=nnx.Rngs(7))
    variables = to_linen(module)
    np.testing.assert_array_equal(to_linen(from_linen(variables, 10))["params"]["W"], module.W[...])
    np.testing.assert_allclose(
        LaxScanModule(8, 10).apply(variables, X), module(X), rtol=RTOL, atol=ATOL
    )


def test_nnx_entry_point_equals_the_nnx_textbook_and_compiles_once_per_signature():
    out = nnx_lax_scan_in_module(5, X, 8, 30)
    textbook = NNXLaxScanModule(8, 30, rngs=nnx.Rngs(5))(X)
    np.testing.assert_allclose(out, textbook, rtol=RTOL, atol=ATOL)
    with traced() as traces:
        nnx_lax_scan_in_module(5, X, 8, 30)  # repeated: no new compile
        nnx_lax_scan_in_module(6, X + 1, 8, 30)  # another seed and x, same signature
    assert traces["_apply"] == 0
    with traced() as traces:
        nnx_lax_scan_in_module(5, X, 8, 31)  # a new T is a new program
        nnx_lax_scan_in_module(5, X[0], 8, 30)  # so is a new x shape
    assert traces["_apply"] == 2


def test_nnx_w_differs_from_the_linen_w_of_the_same_seed():
    # Documented: NNX draws from the Rngs "params" stream, linen from a key folded by path.
    linen_W = LaxScanModule(8, 0).init(jax.random.PRNGKey(0), X)["params"]["W"]
    assert not np.allclose(NNXLaxScanModule(8, 0, rngs=nnx.Rngs(0)).W[...], linen_W)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(hidden=0), ValueError, "hidden must be >= 1, got 0"),
        (dict(T=-1), ValueError, "T must be >= 0, got -1"),
        (dict(T=2.5), TypeError, "T must be an int, got 2.5 of type float"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*32\), got -1"),
        (dict(x=np.ones(3)), ValueError, r"x must have shape \(\.\.\., hidden\) = \(\.\.\., 8\)"),
    ],
)
def test_bad_input_is_rejected(kwargs, error, match):
    args = dict(seed=0, x=X, hidden=8, T=3) | kwargs
    with pytest.raises(error, match=match):
        nnx_lax_scan_in_module(args["seed"], args["x"], args["hidden"], args["T"])


def test_the_module_checks_its_fields_at_construction():
    with pytest.raises(ValueError, match="T must be >= 0, got -1"):
        NNXLaxScanModule(4, -1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="hidden must be an int, got '4' of type str"):
        NNXScanModule("4", 1, rngs=nnx.Rngs(0))


def test_the_module_checks_its_fields_and_input_at_each_call():
    """Fields set after construction are checked where they are used, as x is."""
    module = NNXLaxScanModule(4, 3, rngs=nnx.Rngs(0))
    module.T = -5
    with pytest.raises(ValueError, match="T must be >= 0, got -5"):
        module(jnp.ones(4))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., hidden\) = \(\.\.\., 4\)"):
        NNXScanModule(4, 3, rngs=nnx.Rngs(0))(jnp.ones(5))


def test_rngs_and_linen_weights_are_checked():
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs \(e.g. nnx.Rngs\(0\)\), got 0"):
        NNXLaxScanModule(4, 3, rngs=0)
    with pytest.raises(
        ValueError,
        match=r'variables\["params"\]\["W"\] must be a float \(H, H\) matrix, got float32\[4, 3\]',
    ):
        from_linen({"params": {"W": np.ones((4, 3), np.float32)}}, 3)
    with pytest.raises(
        ValueError,
        match=r"variables must be linen variables \{\"params\": \{\"W\": \(H, H\)\}\}, got \{'params': \{'kernel': ndarray\}\}",
    ):
        from_linen({"params": {"kernel": np.ones((4, 4), np.float32)}}, 3)
    with pytest.raises(
        TypeError, match="module must be an NNXLaxScanModule or NNXScanModule, got dict"
    ):
        to_linen({"params": {"W": np.ones((4, 4), np.float32)}})


@pytest.mark.parametrize("cls", [NNXLaxScanModule, NNXScanModule])
def test_fields_changed_after_construction_are_named_before_the_dot(cls):
    module = cls(4, 3, rngs=nnx.Rngs(0))
    module.hidden = 5
    with pytest.raises(ValueError, match=r"W must be a float \(5, 5\) matrix, got float32\[4, 4\]"):
        module(jnp.ones(5))
    module.hidden = 4
    module.W = nnx.Param(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"W must be a float \(4, 4\) matrix, got float32\[4, 3\]"):
        module(jnp.ones(4))


def test_under_nnx_jit():
    module = NNXScanModule(8, 12, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(module, X), module(X), rtol=RTOL, atol=ATOL
    )
    assert jnp.isfinite(module(X)).all()


def test_a_call_that_cannot_fit_is_refused_before_any_work():
    with pytest.raises(
        MemoryError, match=r"nnx_lax_scan_in_module\(hidden=1000000, T=1\) needs about"
    ):
        nnx_lax_scan_in_module(0, np.ones(1_000_000, np.float32), 1_000_000, 1)
