"""Wall-clock timing of JAX calls: the first call (trace + compile + run) apart from steady runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Timing(NamedTuple):
    first_s: float  # the first call: tracing and compilation included
    median_s: float  # median of the repeated calls that follow
    runs_s: tuple[float, ...]


def time_call(fn: Callable[[], Any], repeats: int = 5) -> Timing:
    """Times `fn()` once cold and `repeats` times warm, waiting for device results each time."""
    first = _timed(fn)
    runs = tuple(_timed(fn) for _ in range(repeats))
    return Timing(first, statistics.median(runs), runs)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compile_seconds(jitted: Callable, *args, **kwargs) -> tuple[Callable, float]:
    """Lowers and compiles `jitted` for these arguments; returns (executable, seconds taken)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start
