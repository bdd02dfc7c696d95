"""The tanh recurrence h ← tanh(h @ W) in Flax NNX: a raw `jax.lax.scan` and its `nnx.scan` twin.

In NNX a module is a Python object holding its state: `W` is an `nnx.Param` created in
`__init__` from `nnx.Rngs`, not declared lazily in `@nn.compact`. The raw-scan form reads the
value once and closes over it — the seed's pattern, unchanged. The `nnx.scan` form passes the
module itself into the lifted step (`in_axes=None`: broadcast to every step), the NNX spelling of
linen's `variable_broadcast="params"`.

`from_linen` / `to_linen` move W between these modules and the linen variables
`{"params": {"W": (H, H)}}` of `scanlab.recurrence`, so the four forms can be compared on one W.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from scanlab import checks
from scanlab.errors import ArgumentError, ArgumentTypeError
from scanlab.recurrence import PARAM_DTYPE, check_call, common_dtype


class NNXLaxScanModule(nnx.Module):
    """h₀ = tanh(x @ W), then T steps of h ← tanh(h @ W), by a raw `jax.lax.scan`.

    Args:
      hidden: H; `x` must have shape (..., H).
      T: steps after the first.
      trajectory: return all states (T + 1, ..., H) instead of the final one.
      rngs: `nnx.Rngs`; its "params" stream draws W (H, H), lecun-normal float32.

    Example:
      >>> module = NNXLaxScanModule(4, 10, rngs=nnx.Rngs(0))
      >>> module(jnp.ones(4)).shape
      (4,)
    """

    def __init__(self, hidden: int, T: int, *, trajectory: bool = False, rngs: nnx.Rngs):
        self.hidden, self.T = checks.recurrence_sizes(hidden, T)
        check_rngs(rngs)
        self.trajectory = bool(trajectory)
        init = nnx.initializers.lecun_normal()
        self.W = nnx.Param(init(rngs.params(), (self.hidden, self.hidden), PARAM_DTYPE))

    def __call__(self, x: ArrayLike) -> jax.Array:
        """(..., H) -> final state (..., H), or all states (T + 1, ..., H) with `trajectory`."""
        # A plain array: the body closes over it, lax.scan sees a constant.
        x, W = common_dtype(self._checked(x), self.W[...])
        init_carry = jnp.tanh(x @ W)

        def body(carry, _):
            new_carry = jnp.tanh(carry @ W)
            return new_carry, new_carry if self.trajectory else None

        final, states = jax.lax.scan(body, init_carry, length=self.T)
        return _with_initial_state(init_carry, states) if self.trajectory else final

    def _checked(self, x: ArrayLike) -> jax.Array:
        """x as an array of shape (..., H), the fields checked again: they may be set after
        construction (`module.T = -5` would otherwise run as 0 steps, a new `hidden` or `W`
        fail inside the dot)."""
        hidden, _ = checks.recurrence_sizes(self.hidden, self.T)
        _check_W(self.W, "W", hidden)
        array = checks.numeric_array("x", x)
        checks.last_axis("x", array, hidden, "hidden")
        return jnp.asarray(array)


class NNXScanModule(NNXLaxScanModule):
    """The `nnx.scan` twin of `NNXLaxScanModule`: same state, same numbers.

    The step takes the module as an argument broadcast to every step (`in_axes=None`) and the
    carry as `nnx.Carry`; capturing the module by closure instead is the NNX pitfall (see
    `scanlab.pitfalls`).
    """

    def __call__(self, x: ArrayLike) -> jax.Array:
        x, W = common_dtype(self._checked(x), self.W[...])
        init_carry = jnp.tanh(x @ W)

        @nnx.scan(in_axes=(None, nnx.Carry), out_axes=(nnx.Carry, 0), length=self.T)
        def step(module, carry):
            new_carry = jnp.tanh(carry @ module.W[...].astype(carry.dtype))
            return new_carry, new_carry if module.trajectory else None

        final, states = step(self, init_carry)
        return _with_initial_state(init_carry, states) if self.trajectory else final


def _check_W(W, name: str, hidden: int | None = None) -> None:
    """A float (H, H) matrix (H = `hidden` when given), as an nnx.Param or an array."""
    if isinstance(W, nnx.Variable):
        W = W[...]
    shape = tuple(getattr(W, "shape", ()))
    dtype = getattr(W, "dtype", None)
    floating = dtype is not None and jnp.dtype(dtype).kind == "f"
    square = len(shape) == 2 and shape[0] == shape[1]
    if not (square and floating) or (hidden is not None and shape[0] != hidden):
        expected = f"({hidden}, {hidden})" if hidden is not None else "(H, H)"
        got = f"{dtype}{list(shape)}" if dtype is not None else type(W).__name__
        raise ArgumentError(f"{name} must be a float {expected} matrix, got {got}")


def check_rngs(rngs) -> None:
    """An `nnx.Rngs`: anything else fails deep inside the first draw."""
    if not isinstance(rngs, nnx.Rngs):
        raise ArgumentTypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {rngs!r}")


def _with_initial_state(init_carry: jax.Array, states: jax.Array) -> jax.Array:
    """(..., H) and (T, ..., H) -> (T + 1, ..., H)."""
    return jnp.concatenate([init_carry[None], states])


def from_linen(
    variables: Mapping,
    T: int,
    *,
    cls: type[NNXLaxScanModule] = NNXLaxScanModule,
    trajectory: bool = False,
) -> NNXLaxScanModule:
    """An NNX module holding the W of linen variables `{"params": {"W": (H, H)}}`."""
    try:
        W = jnp.asarray(variables["params"]["W"])
    except (KeyError, TypeError, IndexError):
        raise ArgumentError(
            'variables must be linen variables {"params": {"W": (H, H)}}, got '
            f"{_describe(variables)}"
        ) from None
    _check_W(W, 'variables["params"]["W"]')
    module = nnx.eval_shape(lambda: cls(W.shape[0], T, trajectory=trajectory, rngs=nnx.Rngs(0)))
    module.W = nnx.Param(W)
    return module


def to_linen(module: NNXLaxScanModule) -> dict:
    """The linen variables `{"params": {"W": (H, H)}}` of an NNX recurrence module."""
    if not isinstance(module, NNXLaxScanModule):
        raise ArgumentTypeError(
            f"module must be an NNXLaxScanModule or NNXScanModule, got {type(module).__name__}"
        )
    return {"params": {"W": module.W[...]}}


def _describe(tree) -> str:
    """A mapping's nested keys with its leaves' types ("{'params': {'kernel': ndarray}}"), else
    its type's name."""
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
    return type(tree).__name__


@functools.lru_cache(maxsize=8)
def _weights(seed: int, hidden: int) -> nnx.State:
    """The module state for (seed, hidden): W, drawn once (T does not change it)."""
    return nnx.state(NNXLaxScanModule(hidden, 0, rngs=nnx.Rngs(seed)))


@functools.lru_cache(maxsize=64)
def _graphdef(hidden: int, T: int, trajectory: bool) -> nnx.GraphDef:
    abstract = nnx.eval_shape(
        lambda: NNXLaxScanModule(hidden, T, trajectory=trajectory, rngs=nnx.Rngs(0))
    )
    return nnx.graphdef(abstract)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)


def nnx_lax_scan_in_module(seed: int, x, hidden: int, T: int, *, trajectory: bool = False):
    """`NNXLaxScanModule(hidden, T, rngs=nnx.Rngs(seed))(x)`, compiled once per signature.

    The NNX twin of `scanlab.lax_scan_in_module`. W is drawn the NNX way, from the "params"
    stream of `nnx.Rngs(seed)`, so it differs from the linen W of the same seed (linen derives
    its key from the variable's path); `from_linen` compares the two on one W. The module's state
    is kept per (seed, hidden) in an LRU of 8, its graph per (hidden, T, trajectory), and the
    apply is compiled once per (graph, x's shape and dtype): a repeated call is one dispatch.

    Args:
      seed: int in [0, 2**32).
      x: (..., H) real numbers.
      hidden: H >= 1.
      T: steps >= 0 after the first.
      trajectory: return all T + 1 states.

    Returns:
      The final state (..., H), or all states (T + 1, ..., H).
    """
    x, hidden, T = check_call("nnx_lax_scan_in_module", seed, x, hidden, T, trajectory=trajectory)
    return _apply(_graphdef(hidden, T, bool(trajectory)), _weights(int(seed), hidden), x)
