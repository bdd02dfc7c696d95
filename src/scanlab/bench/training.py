"""W4: a training run scanned K steps per call vs a Python loop over a jitted step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
from jax.sharding import Mesh

from scanlab.train import TrainConfig, init_state, train_chunk, train_loop


class TrainingPoint(NamedTuple):
    steps: int
    scan_steps_per_s: float  # steady, compilation excluded
    loop_steps_per_s: float
    scan_compile_s: float  # the first chunk's extra time over a steady one
    loop_compile_s: float


def measure(
    config: TrainConfig | None = None, steps: int = 200, repeats: int = 3, mesh: Mesh | None = None
) -> TrainingPoint:
    """Median steps/s of `steps` steps, each way, on the default (tiny) training model."""
    config = config or TrainConfig(steps=max(steps, 200))
    scan = steps_per_s(train_chunk, config, steps, repeats, mesh)
    loop = steps_per_s(train_loop, config, steps, repeats, mesh)
    return TrainingPoint(steps, scan[0], loop[0], scan[1], loop[1])


def steps_per_s(
    run: Callable, config: TrainConfig, steps: int, repeats: int, mesh: Mesh | None
) -> tuple[float, float]:
    """(steady steps/s, compile seconds) of `run` (`train_chunk` or `train_loop`) for `steps`
    steps from a fresh state: the first call's extra time over a steady one is compilation."""
    durations = []
    for _ in range(repeats + 1):
        state = init_state(config, mesh)
        start = time.perf_counter()
        state, losses = run(state, config=config, steps=steps, mesh=mesh)
        jax.block_until_ready(losses)
        durations.append(time.perf_counter() - start)
    steady = sorted(durations[1:])[len(durations[1:]) // 2]
    return steps / steady, durations[0] - steady
