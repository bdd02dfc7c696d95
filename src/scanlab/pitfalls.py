"""The classic pitfalls of `lax.scan`, each run for real: the seed's three inside a Flax module,
the blog's list, two of debugging inside a scan, and four of scanning in Flax NNX.

Each `Pitfall` holds the wrong code and its fix as callables. `reproduce(pitfall)` runs both and
returns the exception the wrong code really raises with today's JAX and Flax, and the fixed code's
result, so what this module teaches is checked on every run rather than copied from old docs. A
pitfall that gives a silent wrong result instead of an error has wrong code that measures the
symptom and raises `SilentWrongResult` with it: if JAX fixes the behaviour, the lesson fails.

One lesson changed since the seed was written: Flax no longer raises a "context error" when
`self.param` or `nn.Dense` is created inside a raw `lax.scan` body. `init` returns normally with
tracers leaked into the variables tree, and the failure only comes at `apply`, as an
`UnexpectedTracerError`. `check_no_leaked_tracers` finds such leaves right after `init`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scanlab.errors import ScanlabError
from scanlab.recurrence import LaxScanModule

_HIDDEN, _T = 4, 3
# NumPy, not JAX, at import time: importing scanlab must not start JAX's backend (see sharding).
_X = np.ones(_HIDDEN, np.float32)
_SEED = 0


class LeakedTracerError(ScanlabError, ValueError):
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


class SilentWrongResult(Exception):
    """Raised by a pitfall's wrong code when it observed the silent wrong result it teaches."""


class FrozenRngError(ScanlabError, ValueError):
    """A call that should draw random numbers left some NNX RNG stream where it was."""


def check_rngs_advance(module: nnx.Module, call: Callable[[], Any]) -> Any:
    """Runs `call()` and raises `FrozenRngError` if any RNG count in `module` did not move.

    An NNX stream draws `fold_in(key, count)` and then increments its count; a transform that
    drops the increment (a raw `jax.lax.scan` whose body's module state is never written back)
    makes the next call draw the same numbers. Returns what `call()` returned.
    """

    def counts() -> dict[str, np.ndarray]:
        # Copied out at once: the state's Variables are the module's own, updated in place.
        leaves = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.RngCount))[0]
        return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in leaves}

    before = counts()
    result = call()
    after = counts()
    frozen = [path for path, count in before.items() if np.array_equal(count, after[path])]
    if frozen:
        raise FrozenRngError(
            f"RNG counts {', '.join(frozen)} did not advance: the next call will draw the same "
            "random numbers (dropout masks). Apply the module with nnx.scan, or return "
            "nnx.state(module) from the raw lax.scan body and nnx.update the module with it."
        )
    return result


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


# --- 5. A debug print with nothing loop-varying in it, under jax.grad ----------------------------


def _printed_under_grad(body) -> list[str]:
    """The lines `jax.debug.print` writes while `jax.grad` runs a 4-step scan of `body`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.grad(lambda c: jax.lax.scan(body, c, jnp.arange(4.0))[0])(1.0)
        jax.effects_barrier()  # prints run asynchronously: wait for them
    return out.getvalue().splitlines()


def _hoisted_print_wrong():
    def body(carry, x):
        jax.debug.print("step")
        return jnp.sin(carry) * x, None

    lines = _printed_under_grad(body)
    if len(lines) != 4:
        raise SilentWrongResult(
            f"jax.debug.print ran {len(lines)} time(s) for 4 steps under jax.grad: {lines}"
        )
    return lines


def _hoisted_print_fixed():
    def body(carry, x):
        jax.debug.print("step x={x} carry={c}", x=x, c=carry)
        return jnp.sin(carry) * x, None

    return len(_printed_under_grad(body))


# --- 6. A carry whose dtype drifts --------------------------------------------------------------

_W_F32 = np.full((_HIDDEN, _HIDDEN), 0.1, np.float32)


def _dtype_drift_wrong():
    h = jnp.ones(_HIDDEN, jnp.bfloat16)
    # Standard promotion, JAX's default, whatever the caller has set: that is where it bites.
    with jax.numpy_dtype_promotion("standard"):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ _W_F32), None), h, length=_T)


def _dtype_drift_fixed():
    h = jnp.ones(_HIDDEN, jnp.bfloat16)
    with jax.numpy_dtype_promotion("standard"):
        body = lambda c, _: (jnp.tanh(c @ _W_F32).astype(c.dtype), None)  # noqa: E731
        return jax.lax.scan(body, h, length=_T)[0]


# --- 7-10. Flax NNX -------------------------------------------------------------------------------


class _DropoutLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(_HIDDEN, _HIDDEN, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(jnp.tanh(self.linear(x)))


def _dropout_stack() -> _DropoutLayer:
    @nnx.split_rngs(splits=_T)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return _DropoutLayer(rngs)

    return create(nnx.Rngs(params=_SEED, dropout=_SEED + 1))


def _raw_scan_no_write_back(stack: _DropoutLayer) -> jax.Array:
    graphdef, state = nnx.split(stack)

    def body(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x), None

    return jax.lax.scan(body, jnp.ones(_HIDDEN), state)[0]


def _raw_scan_with_write_back(stack: _DropoutLayer) -> jax.Array:
    graphdef, state = nnx.split(stack)

    def body(x, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        return layer(x), nnx.state(layer)

    x, new_state = jax.lax.scan(body, jnp.ones(_HIDDEN), state)
    nnx.update(stack, new_state)
    return x


def _rng_loss_wrong():
    stack = _dropout_stack()
    first, second = _raw_scan_no_write_back(stack), _raw_scan_no_write_back(stack)
    if np.array_equal(first, second):
        raise SilentWrongResult(
            "two training calls drew identical dropout masks: the RNG counts advanced inside "
            "the scan were never written back to the module"
        )
    return first, second


def _rng_loss_fixed():
    stack = _dropout_stack()
    first = check_rngs_advance(stack, lambda: _raw_scan_with_write_back(stack))
    second = check_rngs_advance(stack, lambda: _raw_scan_with_write_back(stack))
    assert not np.array_equal(first, second)
    return second


_CLOSURE_XS = np.ones((_T, _HIDDEN), np.float32)


def _closure_dropout_raw_wrong():
    dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=_SEED))
    return jax.lax.scan(lambda c, x: (c, dropout(x)), 0.0, _CLOSURE_XS)


def _closure_dropout_fixed():
    dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=_SEED))

    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def step(dropout, c, x):
        return c, dropout(x)

    return step(dropout, 0.0, _CLOSURE_XS)[1]


def _closure_dropout_nnx_scan_wrong():
    dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=_SEED))
    step = nnx.scan(lambda c, x: (c, dropout(x)), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    return step(0.0, _CLOSURE_XS)


def _fork_split_wrong():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return nnx.Rngs(_SEED).fork(split=_T)


def _fork_split_fixed():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        rngs = nnx.Rngs(_SEED).split(_T)
    return jax.random.key_data(rngs.default.key[...])  # (3, 2): one key per layer


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
    Pitfall(
        title="A debug print inside a scan body that jax.grad hoists out",
        wrong_code='def body(carry, x):\n    jax.debug.print("step")\n    ...',
        error_type=SilentWrongResult,
        error_match="ran 1 time",
        fixed_code='jax.debug.print("step x={x} carry={c}", x=x, c=carry)',
        why=(
            "Under jax.grad, scan splits its body into what the backward pass needs and what it "
            "does not; an effect that reads nothing loop-varying is loop-invariant and is hoisted "
            "out of the loop, so it runs once (jax-ml/jax#16637). Forward alone prints 4 times. "
            "Print a value that changes per step. What is printed is always the forward (primal) "
            "values: gradients never pass through a print, and under jax.checkpoint the backward "
            "pass replays the step, so each line appears twice."
        ),
        wrong=_hoisted_print_wrong,
        fix=_hoisted_print_fixed,
    ),
    Pitfall(
        title="A carry whose dtype drifts between steps",
        wrong_code="h = jnp.ones(4, jnp.bfloat16)\nlambda c, _: (jnp.tanh(c @ W_f32), None)",
        error_type=TypeError,
        error_match="output carry component has type float32",
        fixed_code="lambda c, _: (jnp.tanh(c @ W_f32).astype(c.dtype), None)",
        why=(
            "bfloat16 @ float32 promotes to float32, so the carry would change type after one "
            "step; scan compiles one body for every step. Cast back, or keep W in the carry's "
            "dtype. scanlab.loops names the leaf before anything runs."
        ),
        wrong=_dtype_drift_wrong,
        fix=_dtype_drift_fixed,
    ),
    Pitfall(
        title="NNX: a raw lax.scan over a module stack that drops the RNG updates",
        wrong_code=(
            "graphdef, state = nnx.split(stack)\n"
            "def body(x, layer_state):\n"
            "    return nnx.merge(graphdef, layer_state)(x), None\n"
            "jax.lax.scan(body, x, state)"
        ),
        error_type=SilentWrongResult,
        error_match="identical dropout masks",
        fixed_code=(
            "def body(x, layer_state):\n"
            "    layer = nnx.merge(graphdef, layer_state)\n"
            "    return layer(x), nnx.state(layer)   # the advanced RNG counts\n"
            "x, new_state = jax.lax.scan(body, x, state)\n"
            "nnx.update(stack, new_state)             # or: apply the stack with nnx.scan"
        ),
        why=(
            "Each nnx.Dropout draws fold_in(key, count) and increments count. Inside a raw "
            "lax.scan the increment happens on a merged copy that is thrown away, so every call "
            "repeats the same masks, silently. nnx.scan carries module state in and out for you; "
            "check_rngs_advance(module, call) raises FrozenRngError when a call leaves a count."
        ),
        wrong=_rng_loss_wrong,
        fix=_rng_loss_fixed,
    ),
    Pitfall(
        title="NNX: a Dropout captured by closure inside a raw lax.scan",
        wrong_code="jax.lax.scan(lambda c, x: (c, dropout(x)), 0.0, xs)",
        error_type=flax.errors.TraceContextError,
        error_match="Cannot mutate RngCount from a different trace level",
        fixed_code=(
            "@nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))\n"
            "def step(dropout, c, x):\n"
            "    return c, dropout(x)"
        ),
        why=(
            "Drawing a mask increments the stream's count, a Variable of the outer trace; "
            "NNX refuses to mutate it from inside the scan's trace (google/flax#4151). Pass the "
            "module in as an argument of nnx.scan (in_axes=None broadcasts it)."
        ),
        wrong=_closure_dropout_raw_wrong,
        fix=_closure_dropout_fixed,
    ),
    Pitfall(
        title="NNX: nnx.scan over a closure that mutates a captured module",
        wrong_code="nnx.scan(lambda c, x: (c, dropout(x)), in_axes=(nnx.Carry, 0), ...)",
        error_type=flax.errors.TraceContextError,
        error_match="Cannot mutate RngCount from a different trace level",
        fixed_code="nnx.scan(step, in_axes=(None, nnx.Carry, 0), ...)(dropout, c, xs)",
        why=(
            "nnx.scan lifts only the modules passed as arguments; a captured module is outer "
            "state, mutated from the inner trace. On flax 0.12.8 a captured module that is "
            "only read (a Linear) is accepted; one that updates state (dropout counts, "
            "BatchNorm statistics) raises."
        ),
        wrong=_closure_dropout_nnx_scan_wrong,
        fix=_closure_dropout_fixed,
    ),
    Pitfall(
        title="NNX: rngs.fork(split=n) to create a layer stack's streams",
        wrong_code="nnx.Rngs(0).fork(split=3)",
        error_type=DeprecationWarning,
        error_match="'split' argument of 'fork' is deprecated",
        fixed_code="nnx.Rngs(0).split(3)   # or @nnx.split_rngs(splits=L) around nnx.vmap",
        why="Flax replaced fork(split=...) with Rngs.split; the scan-over-layers recipe uses "
        "nnx.split_rngs + nnx.vmap to create the stack and nnx.scan to apply it.",
        wrong=_fork_split_wrong,
        fix=_fork_split_fixed,
    ),
)
