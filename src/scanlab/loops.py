"""Loops JAX leaves open, each built on `jax.lax.scan` and exact against `scanlab.reference`.

- `masked_scan`: a scan over a padded batch in which every row stops at its own length.
- `bounded_while`: a while loop with a step bound that reverse-mode differentiates.
- `remat_scan`: a scan whose gradient runs in bounded memory (named `jax.checkpoint` policies,
  nested √T segments).
- `linear_scan`: h_t = a_t ⊙ h_{t-1} + b_t, sequentially or as a parallel (associative) scan.

Time is the leading axis of every sequence, as in `jax.lax.scan`. Each function checks its body
abstractly (`jax.eval_shape`) before anything runs: a carry that changes structure, shape or dtype
is refused with a message naming the leaf.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.errors import ArgumentError, ArgumentTypeError

tree_util = jax.tree_util

# Named `jax.checkpoint` policies for a scan body: what each step keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: every intermediate of every step is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the carry, recompute the rest
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# --- checks shared by every loop -----------------------------------------------------------------


def check_carry(where: str, carry_in: Any, carry_out: Any) -> None:
    """Raises TypeError unless `carry_out` has the structure, shapes and dtypes of `carry_in`.

    Both are pytrees of arrays or of `jax.ShapeDtypeStruct`s. A weakly typed input leaf (a Python
    number) may take the body's dtype, as in `jax.lax.scan`.
    """
    in_leaves, in_def = tree_util.tree_flatten_with_path(_abstract(carry_in))
    out_leaves, out_def = tree_util.tree_flatten_with_path(_abstract(carry_out))
    if in_def != out_def:
        raise ArgumentTypeError(
            f"{where} body must return a carry with the structure of its input: "
            f"got {in_def} in and {out_def} out"
        )
    for (path, a), (_, b) in zip(in_leaves, out_leaves, strict=True):
        leaf = "carry" + tree_util.keystr(path)
        if a.shape != b.shape:
            raise ArgumentTypeError(
                f"{where} body changed the carry's shape: {leaf} has shape {a.shape} in and "
                f"{b.shape} out"
            )
        if a.dtype != b.dtype and not a.weak_type:
            raise ArgumentTypeError(
                f"{where} body changed the carry's dtype: {leaf} has dtype {a.dtype} in and "
                f"{b.dtype} out; cast it back, e.g. new.astype({a.dtype})"
            )


def _abstract(tree: Any) -> Any:
    return jax.eval_shape(lambda t: t, tree)


def _as_pair(where: str, output: Any) -> tuple[Any, Any]:
    if not (isinstance(output, tuple | list) and len(output) == 2):
        got = (
            f"an array {output.dtype}{list(output.shape)}"
            if hasattr(output, "shape")
            else type(output).__name__
        )
        raise ArgumentTypeError(
            f"{where} body must return a pair (carry, y), got {got}; "
            "return `new_carry, None` when there is no per-step output"
        )
    return output[0], output[1]


def _leading_size(name: str, tree: Any, axis: int) -> int | None:
    """The common size of `axis` over the leaves of `tree` (None for a tree without leaves)."""
    sizes = {}
    for path, leaf in tree_util.tree_flatten_with_path(tree)[0]:
        shape = np.shape(leaf)
        label = name + tree_util.keystr(path)
        if len(shape) <= axis:
            raise ArgumentError(f"{label} needs an axis {axis}, got shape {shape}")
        sizes[label] = shape[axis]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{label}: {size}" for label, size in sizes.items())
        raise ArgumentError(f"{name} leaves disagree on the size of axis {axis}: {listed}")
    return next(iter(sizes.values()), None)


def _scan_length(xs: Any, length: int | None) -> int:
    n = _leading_size("xs", xs, 0)
    if length is not None:
        length = checks.static_int("length", length, minimum=0)
        if n is not None and n != length:
            raise ArgumentError(f"length must equal the xs time axis, {n}, got {length}")
    if n is not None:
        return n
    if length is None:
        raise ArgumentError("xs has no leaves, so `length` is needed, got None")
    return length


def _step_slice(tree: Any, axis: int) -> Any:
    """One step's abstract slice of time-major leaves: the shapes the body sees."""
    return tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(
            np.shape(leaf)[:axis] + np.shape(leaf)[axis + 1 :], jnp.result_type(leaf)
        ),
        tree,
    )


def _traced_scan_body_check(where: str, f: Callable, carry: Any, x: Any) -> None:
    """Traces f(carry, x) abstractly once and checks the carry it returns."""

    def carry_out(carry, x):
        return _as_pair(where, f(carry, x))[0]

    check_carry(where, carry, jax.eval_shape(carry_out, carry, x))


# --- masked_scan ---------------------------------------------------------------------------------


def masked_scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any,
    lengths: Any,
    length: int | None = None,
    reverse: bool = False,
) -> tuple[Any, Any]:
    """Scans every row of a padded batch over its own first `lengths[b]` steps.

    Row b's carry stops changing after step `lengths[b] - 1`, its outputs past that are zeros,
    and with `reverse` it starts at its own last element, index `lengths[b] - 1`, and runs down
    to 0 — what a backward RNN over a padded batch needs. Equal to running
    `jax.lax.scan(f, init[b], xs[:lengths[b], b], reverse=reverse)` on each row alone and padding
    its ys with zeros (`scanlab.reference.masked_scan`).

    Args:
      f: one row's body, (carry, x) -> (carry, y), on unbatched values (it is vmapped).
      init: pytree of (B, ...) initial carries.
      xs: pytree of (T, B, ...) padded inputs, time first; or None with `length`.
      lengths: (B,) ints in [0, T], the number of real steps of each row (checked when
        concrete; traced lengths outside [0, T] are clamped to it).
      length: T, needed when xs is None.
      reverse: run each row from its own last element down to index 0; ys stay in index order.

    Returns:
      (carry, ys): the carries (B, ...) after each row's last real step; ys (T, B, ...) with
      zeros at t >= lengths[b].
    """
    T = _scan_length(xs, length)
    B = _leading_size("init", init, 0)
    if B is None:
        raise ArgumentError("init must hold the batch's carries (B, ...), got no arrays")
    xs_batch = _leading_size("xs", xs, 1)
    if xs_batch not in (None, B):
        raise ArgumentError(
            f"xs must have init's batch size on axis 1 (T, B, ...): init has B={B}, xs has "
            f"{xs_batch}"
        )
    lengths = jnp.asarray(checks.lengths("lengths", lengths, (B,), T), jnp.int32)
    # Traced lengths could not be checked: clamped, so a row never reads past its padding.
    lengths = jnp.clip(lengths, 0, T)
    x_step = _step_slice(_step_slice(xs, 0), 0)
    _traced_scan_body_check("masked_scan", f, _step_slice(init, 0), x_step)

    def row(carry, xs_row, n):
        t = jnp.arange(T)
        # Reversing a row's real prefix is its own inverse: the same gather restores index order.
        order = jnp.where(t < n, n - 1 - t, t) if reverse else None
        if reverse:
            xs_row = tree_util.tree_map(lambda x: x[order], xs_row)

        def body(carry, step):
            t, x = step
            new_carry, y = f(carry, x)
            carry = tree_util.tree_map(functools.partial(jnp.where, t < n), new_carry, carry)
            return carry, y

        carry, ys = jax.lax.scan(body, carry, (t, xs_row))
        # Outputs past the length are zeroed once, vectorized, rather than selected per step.
        real_T = t < n
        ys = tree_util.tree_map(
            lambda y: jnp.where(real_T.reshape((T,) + (1,) * (y.ndim - 1)), y, 0).astype(y.dtype),
            ys,
        )
        if reverse:
            ys = tree_util.tree_map(lambda y: y[order], ys)
        return carry, ys

    return jax.vmap(row, in_axes=(0, 1, 0), out_axes=(0, 1))(init, xs, lengths)


# --- bounded_while -------------------------------------------------------------------------------


def bounded_while(
    cond: Callable[[Any], Any],
    body: Callable[[Any], Any],
    init: Any,
    max_steps: int,
) -> tuple[Any, jax.Array]:
    """`while cond(carry): carry = body(carry)`, at most `max_steps` times, and differentiable.

    `jax.lax.while_loop` has no reverse-mode derivative (its trip count is unknown, so nothing
    bounds what the backward pass must store). Here the loop is a `lax.scan` of `max_steps`
    steps whose step is `lax.cond(cond(carry), body, identity)`: a finished loop only pays the
    test and the identity per remaining step, and `jax.grad` goes through it like any scan.
    Under `vmap` the cond becomes a select and both branches run.

    Args:
      cond: carry -> bool scalar, tested before each step.
      body: carry -> carry of the same structure, shapes and dtypes.
      init: the initial carry, any pytree of arrays.
      max_steps: the most steps run, an int >= 0 (static: it is the scan's length).

    Returns:
      (carry, steps): the carry when `cond` first fails or after `max_steps` steps, and the int32
      number of steps taken.
    """
    max_steps = checks.static_int("max_steps", max_steps, minimum=0)
    cond_out = jax.eval_shape(cond, init)
    if not (
        isinstance(cond_out, jax.ShapeDtypeStruct)
        and cond_out.shape == ()
        and cond_out.dtype == jnp.bool_
    ):
        raise ArgumentTypeError(f"bounded_while cond must return a bool scalar, got {cond_out}")
    check_carry("bounded_while", init, jax.eval_shape(body, init))

    def step(state, _):
        carry, steps = state
        go = cond(carry)
        carry = jax.lax.cond(go, body, lambda c: c, carry)
        return (carry, steps + go.astype(jnp.int32)), None

    (carry, steps), _ = jax.lax.scan(step, (init, jnp.int32(0)), length=max_steps)
    return carry, steps


# --- remat_scan ----------------------------------------------------------------------------------


def remat_scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    *,
    policy: str = "full",
    segments: int | Literal["sqrt"] = 1,
    reverse: bool = False,
) -> tuple[Any, Any]:
    """`jax.lax.scan` whose gradient keeps bounded memory; the values are the scan's own.

    Under `jax.grad` a plain scan keeps every intermediate of every step for the backward pass:
    memory O(T · step). `policy` names what one step keeps (see `REMAT_POLICIES`): with "full"
    only the carry entering each step, O(T · carry). `segments=S` nests the scan: S outer steps,
    each a checkpointed scan of T / S steps, so the backward pass keeps S carries plus one
    segment's residuals — O(√T) at S = √T ("sqrt" picks the divisor of T nearest √T) — for about
    one extra forward pass of compute.

    Args:
      f, init, xs, length, reverse: as in `jax.lax.scan`.
      policy: one of `REMAT_POLICIES`: "none", "full", "dots", "dots_no_batch".
      segments: an int >= 1 dividing T, or "sqrt".

    Returns:
      (carry, ys), equal to `jax.lax.scan(f, init, xs, length, reverse)`.
    """
    if policy not in REMAT_POLICIES:
        raise ArgumentError(f"policy must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
    T = _scan_length(xs, length)
    segments = _segments(segments, T)
    _traced_scan_body_check("remat_scan", f, init, _step_slice(xs, 0))
    step = f if policy == "none" else jax.checkpoint(f, policy=REMAT_POLICIES[policy])
    if segments == 1:
        return jax.lax.scan(step, init, xs, length=T, reverse=reverse)

    @jax.checkpoint
    def segment(carry, xs_segment):
        return jax.lax.scan(step, carry, xs_segment, length=T // segments, reverse=reverse)

    xs_nested = tree_util.tree_map(lambda x: x.reshape(segments, T // segments, *x.shape[1:]), xs)
    carry, ys = jax.lax.scan(segment, init, xs_nested, length=segments, reverse=reverse)
    return carry, tree_util.tree_map(lambda y: y.reshape(T, *y.shape[2:]), ys)


def _segments(segments: int | str, T: int) -> int:
    if segments == "sqrt":
        return sqrt_segments(T)
    segments = checks.static_int("segments", segments, minimum=1)
    if T % segments:
        raise ArgumentError(
            f"segments must divide T = {T}, got {segments}; try segments={sqrt_segments(T)}"
        )
    return segments


def sqrt_segments(T: int) -> int:
    """The divisor of T nearest √T (1 for T <= 1): the segment count that minimises memory."""
    divisors = [d for d in range(1, math.isqrt(max(T, 1)) + 1) if T % d == 0]
    candidates = divisors + [T // d for d in divisors]
    return min(candidates, key=lambda d: (abs(d - math.sqrt(T)), d)) if T > 1 else 1


# --- linear_scan ---------------------------------------------------------------------------------

# The length from which `method="auto"` takes the associative scan, per backend (None: never).
# CPU: in the W11 regime map of the benchmark report the sequential scan wins every cell, so the
# CPU never switches. GPU/TPU: not measured by this project yet; 1024 follows the published GPU
# crossovers for long sequences.
ASSOCIATIVE_FROM_T: dict[str, int | None] = {"cpu": None, "gpu": 1024, "tpu": 1024}


def linear_scan(
    a: Any,
    b: Any,
    h0: Any = None,
    *,
    method: Literal["auto", "scan", "associative"] = "auto",
) -> jax.Array:
    """All states of the diagonal linear recurrence h_t = a_t ⊙ h_{t-1} + b_t.

    "scan" runs T sequential steps (`jax.lax.scan`, O(T) depth); "associative" composes the
    affine maps h ↦ a ⊙ h + b pairwise with `jax.lax.associative_scan` (O(log T) depth, about
    twice the arithmetic), which pays where many cores wait on a sequential loop. "auto" picks by
    backend and T from `ASSOCIATIVE_FROM_T`.

    Args:
      a: (T, ...) decay factors, real or complex.
      b: (T, ...) inputs, the shape and dtype of `a`.
      h0: (...) the state before t = 0; zeros if None.
      method: "auto", "scan" or "associative".

    Returns:
      h: (T, ...) the states h_0 … h_{T-1}, dtype of `a`.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ArgumentError(
            f"a and b must have one shape and dtype (T, ...), got a {a.dtype}{list(a.shape)} "
            f"and b {b.dtype}{list(b.shape)}"
        )
    if a.ndim == 0:
        raise ArgumentError("a must have shape (T, ...), got a 0-d value")
    if a.dtype.kind not in "fc":
        raise ArgumentTypeError(f"a and b must be real or complex floats, got dtype {a.dtype}")
    if h0 is not None:
        h0 = jnp.asarray(h0)
        if h0.shape != a.shape[1:] or h0.dtype != a.dtype:
            raise ArgumentError(
                f"h0 must have shape a.shape[1:] = {a.shape[1:]} and dtype {a.dtype}, got "
                f"{h0.dtype}{list(h0.shape)}"
            )
    if not a.shape[0]:  # no steps, no states (as `lax.scan` of length 0)
        return a
    if h0 is not None:
        # The state before t = 0 enters as part of the first input: b_0 ← a_0 h0 + b_0.
        b = b.at[0].add(a[0] * h0)
    method = linear_method(method, a.shape[0])
    if method == "scan":
        return _linear_sequential(a, b)
    return _linear_associative(a, b)


def linear_method(method: str, T: int) -> Literal["scan", "associative"]:
    """The method `linear_scan` runs for `method` and length T on the default backend."""
    if method not in ("auto", "scan", "associative"):
        raise ArgumentError(f"method must be 'auto', 'scan' or 'associative', got {method!r}")
    if method != "auto":
        return "scan" if method == "scan" else "associative"
    threshold = ASSOCIATIVE_FROM_T.get(jax.default_backend(), ASSOCIATIVE_FROM_T["gpu"])
    return "associative" if threshold is not None and T >= threshold else "scan"


def _linear_sequential(a: jax.Array, b: jax.Array) -> jax.Array:
    def step(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    return jax.lax.scan(step, jnp.zeros_like(b[0]), (a, b))[1]


def _linear_associative(a: jax.Array, b: jax.Array) -> jax.Array:
    def compose(earlier, later):
        # Applying (a1, b1) then (a2, b2): h ↦ a2 (a1 h + b1) + b2.
        a1, b1 = earlier
        a2, b2 = later
        return a2 * a1, a2 * b1 + b2

    return jax.lax.associative_scan(compose, (a, b))[1]
