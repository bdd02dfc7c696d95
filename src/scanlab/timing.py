"""Wall-clock timing of JAX calls: the first call (trace + compile + run) apart from steady runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np


class Timing(NamedTuple):
    first_s: float  # the first call: tracing and compilation included
    median_s: float  # median of the repeated calls that follow
    runs_s: tuple[float, ...]


def time_call(fn: Callable[[], Any], repeats: int = 5) -> Timing:
    """Times `fn()` once cold and `repeats` times warm, waiting for device results each time."""
    first = seconds(fn)
    runs = tuple(seconds(fn) for _ in range(repeats))
    return Timing(first, statistics.median(runs), runs)


def interleaved(
    fns: Mapping[str, Callable[[], Any]], rounds: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each function, run one call each per round in a shuffled order.

    Interleaving makes a slow patch of a noisy machine (or threads another library left
    spinning) hit every contender alike, which back-to-back repeats do not.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = np.random.default_rng(seed)
    for _ in range(rounds):
        for name in order.permutation(list(fns)):
            samples[name].append(seconds(fns[name]))
    return samples


def seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one call of `fn`, waiting for its device results."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def temp_bytes(compiled: Any) -> int:
    """Temporary bytes XLA's memory analysis gives a compiled program (`.lower().compile()`)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend reports no memory analysis for compiled programs")
    return int(analysis.temp_size_in_bytes)


def compile_seconds(jitted: Any, *args, **kwargs) -> tuple[Callable, float]:
    """Lowers and compiles `jitted` (a `jax.jit` function) for these arguments; returns
    (executable, seconds taken)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start
