"""`jax.lax.scan`'s semantics as a plain Python loop over NumPy.

The JAX documentation explains scan with a few lines of Python::

    def scan(f, init, xs, length=None):
      if xs is None:
        xs = [None] * length
      carry = init
      ys = []
      for x in xs:
        carry, y = f(carry, x)
        ys.append(y)
      return carry, np.stack(ys)

This module is that loop made complete, so that it agrees with `jax.lax.scan` on everything it
accepts: pytrees of carry, xs and ys (None leaves stay None), `xs=None` with `length`, `reverse`,
zero length, ys whose dtype follows the body, dtypes canonicalized as JAX does (32-bit unless
JAX_ENABLE_X64), and a weak-typed init (a Python number) promoted to the type the body returns.
It rejects what `jax.lax.scan` rejects, naming the offending leaf. It is stricter in one place:
a negative or non-int `length` is an error here, while `jax.lax.scan` quietly returns `init`.

No `jax.lax` inside: only NumPy and JAX's pytree and dtype utilities.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from scanlab.errors import ArgumentError, ArgumentTypeError

tree_util = jax.tree_util


class Step(NamedTuple):
    """One iteration of a scan: `carry_out, y = f(carry_in, x)` at position `index` of xs."""

    index: int  # type: ignore[assignment]  # the field, not tuple.index
    carry_in: Any
    x: Any
    carry_out: Any
    y: Any


class _Leaf(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """Loops `f` over the leading axis of `xs`, like `jax.lax.scan`.

    Args:
      f: the body, `(carry, x) -> (carry, y)`; the carry keeps its structure, shapes and dtypes.
      init: the initial carry, any pytree of arrays or numbers.
      xs: pytree of arrays sharing a leading axis of size N, or None (then `length` is needed).
      length: N, checked against the leading axes when xs is given.
      reverse: run from index N - 1 down to 0; ys stay in index order.
      unroll: accepted for signature parity; a Python loop has nothing to unroll.

    Returns:
      `(final carry, ys)`, ys being the body's outputs stacked along a new leading axis of size N.
    """
    _check_unroll(unroll)
    steps = list(iterate(f, init, xs, length, reverse))
    if not steps:
        return _zero_length_result(f, init, xs)
    ordered = sorted(steps, key=lambda step: step.index)
    return steps[-1].carry_out, _stack_ys([step.y for step in ordered])


def iterate(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
) -> Iterator[Step]:
    """Yields each `Step` of the scan in execution order (descending indices under `reverse`)."""
    x_paths, x_leaves, x_treedef = _flatten_xs(xs)
    n = _scan_length(x_paths, x_leaves, length)
    carry = _canonical_tree(init)
    weak = _weak_leaves(init)
    y_spec = None
    for index in reversed(range(n)) if reverse else range(n):
        x = x_treedef.unflatten([leaf[index] for leaf in x_leaves])
        carry, carry_out, y = _run_body(f, carry, x, weak)
        weak = [False] * len(weak)
        y_spec = _check_y(y, y_spec)
        yield Step(index, carry, x, carry_out, y)
        carry = carry_out


def _run_body(f, carry, x, weak: list[bool]):
    """Calls the body once and checks its carry against the input carry.

    A weak-typed leaf (from a Python number) whose dtype the body changes is promoted the way
    JAX does it, and the body is called again on the promoted carry: JAX traces the body twice.
    """
    carry_out, y = _as_pair(f(carry, x))
    carry_out = _canonical_tree(carry_out)
    in_leaves = _describe("carry", carry)
    out_leaves = _describe("carry", carry_out)
    _check_same_structure(carry, carry_out)
    promoted = list(tree_util.tree_leaves(carry))
    must_retry = False
    for i, (expected, got) in enumerate(zip(in_leaves, out_leaves, strict=True)):
        if expected.shape != got.shape:
            raise ArgumentTypeError(
                f"scan body must return a carry of the same type as its input: {expected.path} "
                f"has shape {expected.shape} in and {got.shape} out"
            )
        if expected.dtype != got.dtype:
            if not weak[i]:
                raise ArgumentTypeError(
                    f"scan body must return a carry of the same type as its input: "
                    f"{expected.path} has dtype {expected.dtype} in and {got.dtype} out"
                )
            new_dtype = jax.dtypes.result_type(promoted[i].dtype.type(0).item(), got.dtype)
            promoted[i] = promoted[i].astype(jax.dtypes.canonicalize_dtype(new_dtype))
            must_retry = True
    if must_retry:
        carry = tree_util.tree_structure(carry).unflatten(promoted)
        return _run_body(f, carry, x, [False] * len(weak))
    return carry, carry_out, y


def _check_unroll(unroll) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, numbers.Integral) or unroll < 1:
        raise ArgumentError(f"unroll must be a bool or an int >= 1, got {unroll!r}")


def _flatten_xs(xs):
    """Returns (leaf paths, leaves as canonical arrays, treedef); None subtrees have no leaves."""
    with_paths, treedef = tree_util.tree_flatten_with_path(xs)
    paths = ["xs" + tree_util.keystr(path) for path, _ in with_paths]
    leaves = [_canonical_array(leaf) for _, leaf in with_paths]
    for path, leaf in zip(paths, leaves, strict=True):
        if leaf.ndim == 0:
            hint = (
                " A Python list such as [1, 2, 3] is a pytree of separate 0-d leaves, not a "
                "sequence to scan over: pass an array instead, e.g. np.array([1, 2, 3])."
                if isinstance(xs, list | tuple)
                else ""
            )
            raise ArgumentError(
                f"scan got value with no leading axis to scan over: {path} has shape ().{hint}"
            )
    return paths, leaves, treedef


def _scan_length(paths: list[str], leaves: list[np.ndarray], length) -> int:
    sizes = {path: leaf.shape[0] for path, leaf in zip(paths, leaves, strict=True)}
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise ArgumentError(f"length must be an int >= 0, got {length!r}")
        length = int(length)
    if not sizes:
        if length is None:
            raise ArgumentError("scan got no values to scan over and `length` not provided")
        return length
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{path}: {size}" for path, size in sizes.items())
        raise ArgumentError(f"scan got values with different leading axis sizes: {listed}")
    (n,) = distinct
    if length is not None and length != n:
        raise ArgumentError(
            f"scan got `length` argument of {length} which disagrees with leading axis sizes {n}"
        )
    return n


def _canonical_array(value) -> np.ndarray:
    """A NumPy array with JAX's canonical dtype (float64 -> float32 unless x64 is enabled)."""
    array = np.asarray(value)
    if array.dtype == object:
        raise ArgumentTypeError(
            f"scan leaves must be arrays or numbers, got {type(value).__name__}"
        )
    return array.astype(jax.dtypes.canonicalize_dtype(array.dtype), copy=False)


def _canonical_tree(tree):
    return tree_util.tree_map(_canonical_array, tree)


def _weak_leaves(tree) -> list[bool]:
    """Python numbers are weakly typed in JAX: their dtype yields to the body's."""
    return [isinstance(leaf, int | float | complex) for leaf in tree_util.tree_leaves(tree)]


def _describe(name: str, tree) -> list[_Leaf]:
    return [
        _Leaf(name + tree_util.keystr(path), np.shape(leaf), np.asarray(leaf).dtype)
        for path, leaf in tree_util.tree_flatten_with_path(tree)[0]
    ]


def _as_pair(output):
    if not (isinstance(output, tuple | list) and len(output) == 2):
        kind = type(output).__name__
        shape = f" of shape {np.shape(output)}" if hasattr(output, "shape") else ""
        raise ArgumentTypeError(
            f"scan body output must be a pair (carry, y), got a {kind}{shape}; "
            "return `new_carry, None` when there is no per-step output"
        )
    return output[0], output[1]


def _check_same_structure(carry_in, carry_out) -> None:
    in_def = tree_util.tree_structure(carry_in)
    out_def = tree_util.tree_structure(carry_out)
    if in_def != out_def:
        raise ArgumentTypeError(
            "scan body must return a carry with the same pytree structure as its input: "
            f"got {in_def} in and {out_def} out"
        )


def _check_y(y, spec: tuple | None) -> tuple:
    """The ys of every step must agree in structure, shape and dtype (JAX traces the body once)."""
    got = (tree_util.tree_structure(y), _describe("y", _canonical_tree(y)))
    if spec is not None and got != spec:
        raise ArgumentTypeError(
            f"scan body returned outputs y of different types across steps: {spec} then {got}"
        )
    return got


def _stack_ys(ys: list):
    return tree_util.tree_map(lambda *leaves: np.stack([_canonical_array(v) for v in leaves]), *ys)


def _zero_length_result(f, init, xs):
    """With N = 0 the body never runs, but the output types still come from it.

    JAX learns them by tracing the body; here the body is called once on zeros shaped like one
    step of xs, and only the types of its result are kept.
    """
    x = _canonical_tree(xs)
    x = tree_util.tree_map(lambda leaf: np.zeros(leaf.shape[1:], leaf.dtype), x)
    carry, _, y = _run_body(f, _canonical_tree(init), x, _weak_leaves(init))
    ys = tree_util.tree_map(lambda leaf: np.zeros((0, *leaf.shape), leaf.dtype), _canonical_tree(y))
    return carry, ys


# --- twins of scanlab.loops ----------------------------------------------------------------------
# `scanlab.loops.remat_scan` changes only what the backward pass stores: its twin is `scan` itself.


def masked_scan(f, init, xs, lengths, length=None, reverse=False):
    """Each row b alone: `scan(f, init[b], xs[:lengths[b], b], reverse=reverse)`.

    Args:
      init: pytree of (B, ...); xs: pytree of (T, B, ...) or None with `length`; lengths: (B,).

    Returns:
      (carries (B, ...), ys (T, B, ...)) with each row's ys zero past its length.
    """
    lengths = [int(n) for n in np.asarray(lengths)]
    T = _scan_length(*_flatten_xs(xs)[:2], length)
    rows = []
    for b, n in enumerate(lengths):
        init_b = tree_util.tree_map(lambda leaf, b=b: np.asarray(leaf)[b], init)
        xs_b = tree_util.tree_map(lambda leaf, b=b, n=n: np.asarray(leaf)[:n, b], xs)
        carry, ys = scan(f, init_b, xs_b, length=n, reverse=reverse)
        padded = tree_util.tree_map(
            lambda y: np.concatenate([y, np.zeros((T - y.shape[0], *y.shape[1:]), y.dtype)]), ys
        )
        rows.append((carry, padded))
    carries = tree_util.tree_map(lambda *c: np.stack(c), *[carry for carry, _ in rows])
    ys = tree_util.tree_map(lambda *y: np.stack(y, axis=1), *[ys for _, ys in rows])
    return carries, ys


def bounded_while(cond, body, init, max_steps: int):
    """`while steps < max_steps and cond(carry): carry = body(carry)`; returns (carry, steps)."""
    carry, steps = _canonical_tree(init), 0
    while steps < max_steps and bool(cond(carry)):
        new_carry = _canonical_tree(body(carry))
        _check_same_structure(carry, new_carry)
        if _describe("carry", carry) != _describe("carry", new_carry):
            raise ArgumentTypeError(
                f"bounded_while body must keep the carry's shapes and dtypes: "
                f"{_describe('carry', carry)} in, {_describe('carry', new_carry)} out"
            )
        carry, steps = new_carry, steps + 1
    return carry, steps


def linear_scan(a, b, h0=None):
    """h_t = a_t * h_{t-1} + b_t for t = 0 … T-1 from h_{-1} = h0 (zeros if None); (T, ...)."""
    a, b = _canonical_array(a), _canonical_array(b)
    h = np.zeros(a.shape[1:], a.dtype) if h0 is None else _canonical_array(h0)
    states = []
    for a_t, b_t in zip(a, b, strict=True):
        h = a_t * h + b_t
        states.append(h)
    return np.stack(states) if states else np.zeros(a.shape, a.dtype)
