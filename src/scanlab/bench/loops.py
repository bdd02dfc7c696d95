"""W8–W11: what `scanlab.loops` costs against the plain scan or loop a user would write instead.

W8 masked_scan over a padded batch vs `lax.scan` of the same padded length; W9 bounded_while vs
`lax.while_loop` and vs a scan of max_steps; W10 compiled temporary memory and time of a
gradient per remat policy as T grows; W11 the linear recurrence by sequential vs associative
scan over T × width. All on the driven tanh recurrence h ← tanh(h @ W + x) unless stated.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import loops
from scanlab.timing import interleaved, temp_bytes


class MaskedPoint(NamedTuple):
    B: int
    H: int
    T: int
    masked_s: float  # median, steady
    plain_s: float


class WhilePoint(NamedTuple):
    steps_taken: int
    max_steps: int
    bounded_while_s: float
    while_loop_s: float
    scan_max_steps_s: float


class RematPoint(NamedTuple):
    T: int
    policy: str
    segments: int
    temp_bytes: int  # XLA's compiled memory analysis of jit(grad)
    grad_s: float | None  # one steady gradient; None where not timed


class LinearPoint(NamedTuple):
    T: int
    D: int
    scan_s: float
    associative_s: float


def _medians(fns: dict, rounds: int) -> dict[str, float]:
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile outside the timing
    return {name: float(np.median(s)) for name, s in interleaved(fns, rounds).items()}


def _weight(H: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(seed).standard_normal((H, H)) / np.sqrt(H), jnp.float32
    )


def masked_overhead(B: int, H: int, T: int, rounds: int = 7) -> MaskedPoint:
    """W8: masked_scan with lengths drawn in [T/2, T] vs lax.scan over all T padded steps."""
    rng = np.random.default_rng(0)
    W = _weight(H)
    xs = jnp.asarray(rng.standard_normal((T, B, H)), jnp.float32)
    h0 = jnp.zeros((B, H), jnp.float32)
    lengths = jnp.asarray(rng.integers(T // 2, T + 1, B), jnp.int32)

    def row_step(h, x):
        h = jnp.tanh(h @ W + x)
        return h, h

    masked = jax.jit(lambda xs, lengths: loops.masked_scan(row_step, h0, xs, lengths))
    plain = jax.jit(lambda xs: jax.lax.scan(row_step, h0, xs))
    medians = _medians({"masked": lambda: masked(xs, lengths), "plain": lambda: plain(xs)}, rounds)
    return MaskedPoint(B, H, T, medians["masked"], medians["plain"])


def while_costs(steps_taken: int, max_steps: int, H: int = 64, rounds: int = 7) -> WhilePoint:
    """W9: a loop that stops after `steps_taken` of `max_steps` steps, three ways (forward only)."""
    W = _weight(H)

    def cond(state):
        return state[1] < steps_taken

    def body(state):
        h, i = state
        return jnp.tanh(h @ W), i + 1

    init = (jnp.ones((8, H), jnp.float32), jnp.int32(0))
    bounded = jax.jit(lambda s: loops.bounded_while(cond, body, s, max_steps)[0])
    while_loop = jax.jit(lambda s: jax.lax.while_loop(cond, body, s))

    def all_steps(s):  # what a user writes without early exit: every step runs, masked
        def step(s, _):
            keep_going = cond(s)
            return jax.tree_util.tree_map(
                lambda new, old: jnp.where(keep_going, new, old), body(s), s
            ), None

        return jax.lax.scan(step, s, length=max_steps)[0]

    scan = jax.jit(all_steps)
    medians = _medians(
        {
            "bounded": lambda: bounded(init),
            "while": lambda: while_loop(init),
            "scan": lambda: scan(init),
        },
        rounds,
    )
    return WhilePoint(steps_taken, max_steps, medians["bounded"], medians["while"], medians["scan"])


REMAT_VARIANTS = (("none", 1), ("full", 1), ("dots", 1), ("none", "sqrt"), ("full", "sqrt"))


def remat_memory(T: int, B: int = 4, H: int = 256, time_it: bool = True) -> list[RematPoint]:
    """W10: jit(grad) of the recurrence over T steps, per (policy, segments) variant."""
    W = _weight(H)
    h0 = jnp.ones((B, H), jnp.float32)

    def step(h, _):
        return jnp.tanh(h @ W), None

    points = []
    for policy, segments in REMAT_VARIANTS:

        def loss(h, policy=policy, segments=segments):
            final, _ = loops.remat_scan(step, h, length=T, policy=policy, segments=segments)
            return final.sum()

        compiled = jax.jit(jax.grad(loss)).lower(h0).compile()
        grad_s = None
        if time_it:
            jax.block_until_ready(compiled(h0))
            start = time.perf_counter()
            jax.block_until_ready(compiled(h0))
            grad_s = time.perf_counter() - start
        n_segments = loops.sqrt_segments(T) if segments == "sqrt" else int(segments)
        points.append(RematPoint(T, policy, n_segments, temp_bytes(compiled), grad_s))
    return points


def linear_regime(T: int, D: int, rounds: int = 7) -> LinearPoint:
    """W11: h_t = a_t h_{t-1} + b_t over (T, D), sequential vs associative."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0, 1, (T, D)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    scan = jax.jit(functools.partial(loops.linear_scan, method="scan"))
    associative = jax.jit(functools.partial(loops.linear_scan, method="associative"))
    fns = {"scan": lambda: scan(a, b), "associative": lambda: associative(a, b)}
    medians = _medians(fns, rounds)
    return LinearPoint(T, D, medians["scan"], medians["associative"])
