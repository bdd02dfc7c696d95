"""The seed's three pitfalls of raw `lax.scan` inside a Flax module, and the blog's list pitfall.

Each `Pitfall` holds the wrong code and its fix as callables. `reproduce(pitfall)` runs both and
returns the exception the wrong code really raises with today's JAX and Flax, and the fixed code's
result, so what this module teaches is checked on every run rather than copied from old docs.

One lesson changed since the seed was written: Flax no longer raises a "context error" when
`self.param` or `nn.Dense` is created inside a raw `lax.scan` body. `init` returns normally with
tracers leaked into the variables tree, and the failure only comes at `apply`, as an
`UnexpectedTracerError`. `check_no_leaked_tracers` finds such leaves right after `init`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scanlab.recurrence import LaxScanModule

_HIDDEN, _T = 4, 3
# NumPy, not JAX, at import time: importing scanlab must not start JAX's backend (see sharding).
_X = np.ones(_HIDDEN, np.float32)
_SEED = 0


class LeakedTracerError(ValueError):
    """A variables tree holds tracers: a Flax variable was created inside a transformed function."""


def check_no_leaked_tracers(variables: Any) -> None:
    """Raises `LeakedTracerError` naming each leaf of `variables` that is a leaked tracer."""
    leaked = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
        if isinstance(leaf, jax.core.Tracer)
    ]
    if leaked:
        raise LeakedTracerError(
            f"variables {', '.join(leaked)} are leaked tracers, not arrays: they were created "
            "inside a jax.lax.scan (or another JAX transform) body. Declare them with self.param "
            "or nn.Dense outside the body and close over them, or lift the body with nn.scan."
        )


class Pitfall(NamedTuple):
    """A mistake, the error it raises, and its fix."""

    title: str
    wrong_code: str
    error_type: type[BaseException]
    error_match: str
    fixed_code: str
    why: str
    wrong: Callable[[], Any]
    fix: Callable[[], Any]


class Reproduction(NamedTuple):
    pitfall: Pitfall
    error: BaseException
    fixed_result: Any


def error_summary(error: BaseException) -> str:
    """The error's first sentence: its first line, plus the next when the first ends in a colon."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    summary = lines[0]
    if summary.endswith(":") and len(lines) > 1:
        summary += " " + lines[1]
    return summary


def reproduce(pitfall: Pitfall) -> Reproduction:
    """Runs the wrong code (it must raise the documented error) and the fix."""
    try:
        pitfall.wrong()
    except pitfall.error_type as error:
        if pitfall.error_match not in str(error):
            raise AssertionError(
                f"{pitfall.title}: expected {pitfall.error_type.__name__} mentioning "
                f"{pitfall.error_match!r}, got: {error}"
            ) from error
        return Reproduction(pitfall, error, pitfall.fix())
    raise AssertionError(f"{pitfall.title}: the wrong code did not raise")


# --- 1. Flax variables created inside the raw lax.scan body -------------------------------------


class _ParamInsideBody(nn.Module):
    hidden: int
    T: int

    @nn.compact
    def __call__(self, x):
        def body(carry, _):
            W = self.param("W", nn.initializers.lecun_normal(), (self.hidden, self.hidden))
            return jnp.tanh(carry @ W), None

        return jax.lax.scan(body, x, jnp.arange(self.T))[0]


def _param_inside_body_wrong():
    module = _ParamInsideBody(_HIDDEN, _T)
    variables = module.init(jax.random.PRNGKey(_SEED), _X)  # returns normally: W is a tracer
    return module.apply(variables, _X)


def _param_inside_body_fixed():
    module = LaxScanModule(_HIDDEN, _T)
    variables = module.init(jax.random.PRNGKey(_SEED), _X)
    check_no_leaked_tracers(variables)
    return module.apply(variables, _X)


# --- 2. A carry that changes shape --------------------------------------------------------------


def _carry_shape_wrong():
    return jax.lax.scan(lambda c, _: (jnp.concatenate([c, c]), None), _X, jnp.arange(_T))


def _carry_shape_fixed():
    # Project back to the carry's shape (here: average the halves) so every step matches.
    def body(carry, _):
        doubled = jnp.concatenate([carry, carry])
        return doubled.reshape(2, -1).mean(axis=0), None

    return jax.lax.scan(body, _X, jnp.arange(_T))[0]


# --- 3. A body that returns the carry alone -----------------------------------------------------


def _carry_alone_wrong():
    return jax.lax.scan(lambda c, _: jnp.tanh(c), _X, jnp.arange(_T))


def _carry_alone_fixed():
    return jax.lax.scan(lambda c, _: (jnp.tanh(c), None), _X, jnp.arange(_T))[0]


# --- 4. xs given as a Python list (the blog example) --------------------------------------------


def _python_list_wrong():
    return jax.lax.scan(lambda c, x: (c + x, x + 2), 0, [1, 2, 3])


def _python_list_fixed():
    return jax.lax.scan(lambda c, x: (c + x, x + 2), 0, np.array([1, 2, 3]))


PITFALLS: tuple[Pitfall, ...] = (
    Pitfall(
        title="Allocating a Flax variable inside the raw lax.scan body",
        wrong_code="def body(carry, _):\n    W = self.param('W', ...)\n    ...",
        error_type=jax.errors.UnexpectedTracerError,
        error_match="Encountered an unexpected tracer",
        fixed_code="W = self.param('W', ...)  # outside\ndef body(carry, _): ...closes over W",
        why=(
            "lax.scan traces the body into its own scope; a variable created there is a tracer "
            "that escapes into the variables tree. Today's Flax lets init return it and apply "
            "fails; check_no_leaked_tracers(variables) catches it right after init."
        ),
        wrong=_param_inside_body_wrong,
        fix=_param_inside_body_fixed,
    ),
    Pitfall(
        title="A carry whose shape or dtype changes",
        wrong_code="lambda c, _: (jnp.concatenate([c, c]), None)",
        error_type=TypeError,
        error_match="carry input and carry output must have equal types",
        fixed_code=(
            "def body(carry, _):\n"
            "    doubled = jnp.concatenate([carry, carry])\n"
            "    return doubled.reshape(2, -1).mean(axis=0), None  # back to the carry's shape"
        ),
        why="scan compiles one body for all steps, so the carry's type is fixed by init.",
        wrong=_carry_shape_wrong,
        fix=_carry_shape_fixed,
    ),
    Pitfall(
        title="Returning the carry alone instead of (carry, output)",
        wrong_code="lambda c, _: jnp.tanh(c)",
        error_type=TypeError,
        error_match="scan body output must be a pair",
        fixed_code="lambda c, _: (jnp.tanh(c), None)",
        why="scan always unpacks (carry, y); None as y stacks nothing.",
        wrong=_carry_alone_wrong,
        fix=_carry_alone_fixed,
    ),
    Pitfall(
        title="Scanning over a Python list",
        wrong_code="jax.lax.scan(lambda c, x: (c + x, x + 2), 0, [1, 2, 3])",
        error_type=ValueError,
        error_match="no leading axis",
        fixed_code="jax.lax.scan(lambda c, x: (c + x, x + 2), 0, np.array([1, 2, 3]))",
        why="A list is a pytree of three 0-d leaves, not a sequence: stack it into one array.",
        wrong=_python_list_wrong,
        fix=_python_list_fixed,
    ),
)
