"""The tanh recurrence h ← tanh(h @ W) over time, written the seed's way and its nn.scan twin.

`LaxScanModule` is the seed's pattern: one weight declared with `self.param` outside a raw
`jax.lax.scan`, the body closing over it. `NNScanModule` is the same recurrence lifted with
`nn.scan` (params broadcast, no RNG split); both produce the parameter tree
`{"params": {"W": (H, H)}}` and the same numbers. `lax_scan_in_module` is the seed's function,
compiled once per static signature.
"""

from __future__ import annotations

import functools
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from scanlab import checks, loops, sharding

# Pinned so that JAX_ENABLE_X64=1 draws the same W from the same seed.
PARAM_DTYPE = jnp.float32


def _declare_w(module: nn.Module, hidden: int) -> jax.Array:
    return module.param("W", nn.initializers.lecun_normal(), (hidden, hidden), PARAM_DTYPE)


def check_call(entry: str, seed, x, hidden, T, *, trajectory: bool):
    """The seed function's arguments, checked before any work, for the linen and NNX entry points.

    Refuses a call whose W and states could not fit in memory, naming `entry`, the caller.
    Returns (x as an array, hidden, T).
    """
    x, hidden, T = checks.recurrence_args(seed, x, hidden, T)
    rows = int(np.prod(x.shape[:-1]))
    states = (T + 1) if trajectory else 2  # every state, or the carry in and out
    checks.fits_in_memory(f"{entry}(hidden={hidden}, T={T})", 4 * hidden * (hidden + rows * states))
    return x, hidden, T


def common_dtype(x: jax.Array, W: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x and W in one dtype, chosen explicitly: float64 for float64 x (x64 mode), else W's.

    Spelled out so that the module runs under `jax_numpy_dtype_promotion="strict"` too, with
    the result dtype standard promotion would give (ints and half floats compute in float32).
    """
    dtype = jnp.float64 if x.dtype == jnp.float64 else W.dtype
    return x.astype(dtype), W.astype(dtype)


def _with_initial_state(init_carry: jax.Array, states: jax.Array) -> jax.Array:
    """(..., H) and (T, ..., H) -> (T + 1, ..., H)."""
    return jnp.concatenate([init_carry[None], states])


class LaxScanModule(nn.Module):
    """h₀ = tanh(x @ W), then T steps of h ← tanh(h @ W), by a raw `jax.lax.scan`.

    `W` (H, H), lecun-normal float32, is declared once, outside the scan; the body closes over it,
    so `lax.scan` sees a constant and no Flax lifting is needed.

    Attributes:
      hidden: H, the state width; `x` must have shape (..., H).
      T: number of recurrence steps after the first; T = 0 returns tanh(x @ W).
      trajectory: if True, return every state (T + 1, ..., H) instead of the final one.

    Example:
      >>> module = LaxScanModule(hidden=4, T=10)
      >>> variables = module.init(jax.random.PRNGKey(0), jnp.ones(4))
      >>> module.apply(variables, jnp.ones(4)).shape
      (4,)
    """

    hidden: int
    T: int
    trajectory: bool = False

    def __post_init__(self):
        checks.recurrence_sizes(self.hidden, self.T)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, seq_lengths: jax.Array | None = None) -> jax.Array:
        """(..., H) -> final state (..., H), or all states (T + 1, ..., H) with `trajectory`.

        `seq_lengths` (...) ints in [0, T] give each row its own number of steps: a row stops at
        its length (`scanlab.loops.masked_scan`) and its trajectory is zero past it.
        """
        x = jnp.asarray(x)
        checks.last_axis("x", x, self.hidden, "hidden")
        x, W = common_dtype(x, _declare_w(self, self.hidden))
        init_carry = jnp.tanh(x @ W)

        def body(carry, _):
            new_carry = jnp.tanh(carry @ W)
            return new_carry, new_carry if self.trajectory else None

        if seq_lengths is None:
            final, states = jax.lax.scan(body, init_carry, jnp.arange(self.T))
        else:
            final, states = _ragged_scan(body, init_carry, seq_lengths, self.T)
        return _with_initial_state(init_carry, states) if self.trajectory else final


def _ragged_scan(body, init_carry: jax.Array, seq_lengths: jax.Array, T: int):
    """`masked_scan` with the batch axes (...) of init_carry (..., H) flattened into one row axis.

    Returns the final states (..., H) and the states (T, ..., H), or None without trajectory.
    """
    batch, H = init_carry.shape[:-1], init_carry.shape[-1]
    final, states = loops.masked_scan(
        body, init_carry.reshape(-1, H), None, seq_lengths.reshape(-1), T
    )
    states = None if states is None else states.reshape(T, *batch, H)
    return final.reshape(*batch, H), states


class NNScanModule(nn.Module):
    """The nn.scan twin of `LaxScanModule`: same fields, same parameter tree, same numbers.

    The step is lifted with `nn.scan(variable_broadcast="params", split_rngs={"params": False})`:
    the one `W` is broadcast to every step rather than stacked per step, which is exactly what the
    raw `lax.scan` gets for free by closing over it.
    """

    hidden: int
    T: int
    trajectory: bool = False

    def __post_init__(self):
        checks.recurrence_sizes(self.hidden, self.T)
        super().__post_init__()

    def setup(self):
        self.W = _declare_w(self, self.hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., H) -> final state (..., H), or all states (T + 1, ..., H) with `trajectory`."""
        x = jnp.asarray(x)
        checks.last_axis("x", x, self.hidden, "hidden")
        x, W = common_dtype(x, self.W)
        init_carry = jnp.tanh(x @ W)

        def body(module, carry, _):
            new_carry = jnp.tanh(carry @ W)
            return new_carry, new_carry if self.trajectory else None

        scan = nn.scan(
            body, variable_broadcast="params", split_rngs={"params": False}, length=self.T
        )
        final, states = scan(self, init_carry, None)
        return _with_initial_state(init_carry, states) if self.trajectory else final


@functools.partial(jax.jit, static_argnames="hidden")
def _init_weights(key: jax.Array, *, hidden: int) -> jax.Array:
    # W depends only on the key and the parameter's path, not on x or T: init on a dummy x.
    return LaxScanModule(hidden, 0).init(key, jnp.zeros(hidden, PARAM_DTYPE))["params"]["W"]


@functools.lru_cache(maxsize=8)
def _weights(seed: int, hidden: int) -> jax.Array:
    """W for (seed, hidden), drawn once: a repeated call skips the truncated-normal draw."""
    key = checks.seed_key(seed)
    W = _init_weights(key, hidden=hidden)
    if isinstance(W, jax.core.Tracer):
        # The first call came while tracing an outer jit: a cached tracer would leak into every
        # later call, so evaluate it now (slower, op by op: only in this case).
        with jax.ensure_compile_time_eval():
            W = _init_weights(key, hidden=hidden)
    return W


@functools.partial(jax.jit, static_argnames=("hidden", "T", "trajectory"))
def _apply(
    W: jax.Array,
    x: jax.Array,
    seq_lengths: jax.Array | None,
    *,
    hidden: int,
    T: int,
    trajectory: bool,
) -> jax.Array:
    module = LaxScanModule(hidden, T, trajectory)
    return cast(jax.Array, module.apply({"params": {"W": W}}, x, seq_lengths))


def lax_scan_in_module(
    seed: int,
    x,
    hidden: int,
    T: int,
    *,
    trajectory: bool = False,
    check_finite: bool = False,
    seq_lengths=None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """The seed's function: init `LaxScanModule` with `PRNGKey(seed)` and `x`, apply, return.

    Equal to the textbook `init` + `apply` (same W from the same seed), but compiled once per
    static signature and reused: `init` once per hidden, `apply` once per (hidden, T, trajectory,
    x's shape and dtype). W depends only on (seed, hidden), so the last 8 such weights are kept
    (an LRU cache, at most 8·H² floats): a call in a loop costs one dispatch of the compiled
    apply.

    Args:
      seed: int in [0, 2**32), the PRNGKey seed for W.
      x: (..., H) real numbers — list, NumPy or JAX array; leading axes are batch axes.
      hidden: H >= 1.
      T: steps >= 0 after the first.
      trajectory: return all T + 1 states (T + 1, ..., H) instead of the final one.
      check_finite: raise if x holds NaN or Inf (needs a concrete x).
      seq_lengths: optional (...) ints in [0, T], one per row of x: row b runs seq_lengths[b]
        steps instead of T (its trajectory is zero past them).
      mesh: split x's leading batch axis over this mesh's "data" axis (W replicated): each
        device runs the scan on its rows. See `scanlab.sharding`.

    Returns:
      The final state, (..., H) float32 (float64 if x is float64 under JAX_ENABLE_X64).
    """
    x, hidden, T = check_call("lax_scan_in_module", seed, x, hidden, T, trajectory=trajectory)
    if check_finite:
        checks.all_finite("x", x)
    if seq_lengths is not None:
        seq_lengths = checks.lengths("seq_lengths", seq_lengths, x.shape[:-1], T)
    W = _weights(int(seed), hidden)
    if mesh is not None:
        # The compiled apply follows its inputs' shardings: no communication, rows independent.
        x, W = sharding.shard_batch(x, mesh, "x"), sharding.replicate(W, mesh)
    return _apply(W, x, seq_lengths, hidden=hidden, T=T, trajectory=bool(trajectory))
