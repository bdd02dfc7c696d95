"""Argument checks shared by the public API.

Each check raises before any tracing, with a message that names the argument, what was expected and
what came, so a mistake surfaces as one clear line instead of a trace-time stack. The checks do not
import JAX: the CLI runs them before it loads anything heavy.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from scanlab.errors import ArgumentError, ArgumentTypeError, OutOfMemoryError, PathError

if TYPE_CHECKING:
    import jax

SEED_LIMIT = 2**32

_SPELLING: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "scanlab_spelling", default=None
)


def shown(name: str) -> str:
    """An argument's name as the caller spelled it: inside `spelled_as` (the CLI), its flag."""
    return (_SPELLING.get() or {}).get(name, name)


def switched_on(name: str) -> str:
    """How the caller turns a boolean argument on: `--resume` on the command line, else
    `resume=True`."""
    spelled = shown(name)
    return spelled if spelled.startswith("-") else f"{name}=True"


@contextlib.contextmanager
def spelled_as(spelling: Mapping[str, str]) -> Iterator[None]:
    """Messages name the arguments in `spelling` (Python name -> what the user typed, e.g.
    "max_new_tokens" -> "--max-new-tokens") while the block runs."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


def imported_jax():
    """JAX, if something has imported it (a lazy proxy in sys.modules does not count), else None:
    without JAX loaded, no value can be a JAX array or tracer."""
    if "jax._src.core" not in sys.modules:
        return None
    import jax

    return jax


def is_tracer(value: object) -> TypeGuard[jax.core.Tracer]:
    """Whether `value` is a JAX tracer."""
    jax = imported_jax()
    return jax is not None and isinstance(value, jax.core.Tracer)


def is_jax_array(value: object) -> TypeGuard[jax.Array]:
    """Whether `value` is a JAX array or tracer (passed through untouched by the checks)."""
    jax = imported_jax()
    return jax is not None and isinstance(value, jax.Array)


# Loop lengths and sizes are int32 inside XLA programs.
INT32_MAX = 2**31 - 1


def static_int(name: str, value: object, *, minimum: int, maximum: int = INT32_MAX) -> int:
    """Returns `value` as an int if it is a concrete Python/NumPy integer in [minimum, maximum].

    Shapes and loop lengths decide compilation, so they must be static: a traced value is refused
    with the fix (mark the argument static), and so are bools, floats and strings.
    """
    if is_tracer(value):
        raise ArgumentTypeError(
            f"{name} must be a static Python int, got a traced value {value.aval}; "
            f"it decides the compiled shape, so pass it as a static argument "
            f"(e.g. jax.jit(..., static_argnames={name!r}))"
        )
    name = shown(name)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(
            f"{name} must be an int, got {value!r} of type {type(value).__name__}"
        )
    value = int(value)
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ArgumentError(f"{name} must be <= {maximum}, got {value}")
    return value


def finite_number(
    name: str, value: object, *, minimum: float | None = None, above: float | None = None
) -> float:
    """Returns `value` as a float if it is a finite real number (>= minimum, > above)."""
    name = shown(name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{name} must be a number, got {value!r} of type {type(value).__name__}"
        )
    value = float(value)
    if not np.isfinite(value):
        raise ArgumentError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ArgumentError(f"{name} must be > {above}, got {value}")
    return value


def sampling_options(
    vocab_size: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
) -> dict:
    """Generation's sampling settings, checked (`scanlab.decoder.sampling.settings` makes them
    traced values): temperature >= 0 (0: greedy, which takes only the repetition penalty),
    top_k in [1, vocab_size] or None, top_p in (0, 1], min_p in [0, 1], penalty > 0."""
    temperature = finite_number("temperature", temperature, minimum=0.0)
    top_p = finite_number("top_p", top_p, minimum=0.0)
    min_p = finite_number("min_p", min_p, minimum=0.0)
    penalty = finite_number("repetition_penalty", repetition_penalty, minimum=0.0)
    if top_k is not None:
        top_k = static_int("top_k", top_k, minimum=1)
        if top_k > vocab_size:
            raise ArgumentError(f"{shown('top_k')} must be <= vocab_size={vocab_size}, got {top_k}")
    if not 0 < top_p <= 1:
        raise ArgumentError(f"{shown('top_p')} must be in (0, 1], got {top_p}")
    if min_p > 1:
        raise ArgumentError(f"{shown('min_p')} must be in [0, 1], got {min_p}")
    if penalty == 0:
        raise ArgumentError(f"{shown('repetition_penalty')} must be > 0, got 0")
    if temperature == 0:
        for name, value, neutral in (
            ("top_k", top_k, None),
            ("top_p", top_p, 1.0),
            ("min_p", min_p, 0.0),
        ):
            if value != neutral:
                raise ArgumentError(
                    f"{shown(name)} needs {shown('temperature')} > 0 (greedy takes the most "
                    f"likely token), got {shown(name)}={value}"
                )
    return dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=penalty,
    )


def available_bytes() -> int | None:
    """Memory this process's first device can hold: its reported limit, else the host's RAM."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return host_memory_bytes()


def host_memory_bytes() -> int | None:
    """The host's RAM, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None  # unknown platform: no estimate to refuse by


def fits_in_memory(what: str, nbytes: int) -> None:
    """Raises MemoryError up front when an estimated allocation exceeds what the device holds."""
    limit = available_bytes()
    if limit is not None and nbytes > limit:
        raise OutOfMemoryError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB, more than the "
            f"{limit / 2**30:.1f} GiB this device has"
        )


def instance(name: str, value: object, expected: type, alternative: str = "") -> None:
    """Refuses a `value` that is not an `expected` (a dict where a config belongs, say) in one
    line naming the argument, rather than a failure deep inside; `alternative` says how to
    build one."""
    if not isinstance(value, expected):
        hint = f": {alternative}" if alternative else ""
        raise ArgumentTypeError(
            f"{shown(name)} must be a {expected.__name__}, got {type(value).__name__}{hint}"
        )


def path_like(name: str, value: object) -> Path:
    """`value` as a Path, if it is a str or os.PathLike."""
    if not isinstance(value, str | os.PathLike):
        raise ArgumentTypeError(
            f"{shown(name)} must be a str or os.PathLike, got {type(value).__name__}"
        )
    return Path(value)


def writable_dir(name: str, path: str | os.PathLike) -> Path:
    """Creates the directory if needed and proves it writable, before any long work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{shown(name)} must be a directory, got {str(path)!r}, a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise PathError(
            f"{shown(name)} must be a writable directory, got {str(path)!r}: {error}"
        ) from None
    return path


def seed_key(seed: object) -> np.ndarray:
    """Returns the raw key `jax.random.PRNGKey(seed)` builds, computed on the host.

    Seeds are limited to [0, 2**32): beyond it PRNGKey keeps only the low 32 bits unless
    JAX_ENABLE_X64 is set, so the same seed would give different weights in the two modes.
    Building the key with NumPy keeps the per-call path free of eager JAX dispatches.

    Returns:
      uint32 array of shape (2,), equal to `jax.random.PRNGKey(seed)`.
    """
    if is_tracer(seed):
        raise ArgumentTypeError(f"seed must be a Python int, got a traced value {seed.aval}")
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral):
        raise ArgumentTypeError(
            f"{shown('seed')} must be an int, got {seed!r} of type {type(seed).__name__}"
        )
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ArgumentError(f"{shown('seed')} must be in [0, 2**32), got {seed}")
    return np.array([0, seed], dtype=np.uint32)


def prng_key(name: str, key: object, *, optional: bool = False) -> None:
    """A PRNG key: a typed key (`jax.random.key`) or a raw one (`PRNGKey`, (2,) uint32); None
    too when `optional`."""
    if key is None and optional:
        return
    jax = imported_jax()
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
    typed = (
        jax is not None and dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    )
    raw = dtype == np.uint32 and shape == (2,)
    if not ((typed and shape == ()) or raw):
        expected = "None or a PRNG key" if optional else "a PRNG key"
        raise ArgumentTypeError(
            f"{shown(name)} must be {expected} (jax.random.key(seed) or PRNGKey(seed)), got "
            f"{type(key).__name__} of shape {shape} and dtype {dtype}"
        )


def recurrence_sizes(hidden: object, T: object) -> tuple[int, int]:
    """hidden >= 1 and T >= 0 as static ints: the recurrence modules' fields and entry points'
    arguments."""
    return static_int("hidden", hidden, minimum=1), static_int("T", T, minimum=0)


def recurrence_args(seed: object, x: object, hidden: object, T: object):
    """The seed function's (seed, x, hidden, T), checked: returns (x as an array, hidden, T)."""
    hidden, T = recurrence_sizes(hidden, T)
    seed_key(seed)
    x = numeric_array("x", x)
    last_axis("x", x, hidden, "hidden")
    return x, hidden, T


def numeric_array(name: str, value: object) -> np.ndarray | jax.Array:
    """Returns `value` as an array of booleans-excluded real numbers (int or float dtype).

    JAX arrays and tracers pass through untouched; lists and NumPy arrays become NumPy arrays.
    """
    array = value if is_jax_array(value) else np.asarray(value)
    name = shown(name)
    if array.dtype.kind not in "iuf":
        raise ArgumentTypeError(
            f"{name} must hold real numbers (int or float dtype), got dtype {array.dtype}"
        )
    return array


def last_axis(name: str, array: np.ndarray | jax.Array, size: int, size_name: str) -> None:
    """Checks that `array` has shape (..., size)."""
    name, size_name = shown(name), shown(size_name)
    if array.ndim == 0:
        raise ArgumentError(
            f"{name} must have shape (..., {size_name}) = (..., {size}), got a 0-d value"
        )
    if array.shape[-1] != size:
        raise ArgumentError(
            f"{name} must have shape (..., {size_name}) = (..., {size}), got shape {array.shape}"
        )


def all_finite(name: str, array: np.ndarray | jax.Array) -> None:
    """Checks that a concrete array holds no NaN or Inf."""
    name = shown(name)
    if is_tracer(array):
        raise ArgumentTypeError(
            f"check_finite needs a concrete {name}, got a traced value {array.aval}"
        )
    bad = ~np.isfinite(np.asarray(array))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ArgumentError(
            f"{name} must be finite, got {int(bad.sum())} NaN/Inf value(s), first at index {first}"
        )


def lengths(
    name: str, value: object, batch_shape: tuple[int, ...], T: int
) -> np.ndarray | jax.Array:
    """Checks per-row step counts: integers of shape `batch_shape`, each in [0, T] when concrete."""
    array = value if is_jax_array(value) else np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.shape != tuple(batch_shape):
        raise ArgumentError(
            f"{name} must have shape {tuple(batch_shape)} (one per row), got shape {array.shape}"
        )
    if not is_tracer(array):
        values = np.asarray(array)
        bad = (values < 0) | (values > T)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ArgumentError(
                f"{name} must be in [0, T] = [0, {T}], got {name}[{', '.join(map(str, index))}] "
                f"= {int(values[index])}"
            )
    return array
