"""W4: a training run scanned K steps per call vs a Python loop over a jitted step."""

from __future__ import annotations

import time
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
    runs = {}
    for name, run in (("scan", train_chunk), ("loop", train_loop)):
        durations = []
        for _ in range(repeats + 1):  # the first includes compilation
            state = init_state(config, mesh)
            start = time.perf_counter()
            state, losses = run(state, config=config, steps=steps, mesh=mesh)
            jax.block_until_ready(losses)
            durations.append(time.perf_counter() - start)
        steady = sorted(durations[1:])[len(durations[1:]) // 2]
        runs[name] = (steps / steady, durations[0] - steady)
    return TrainingPoint(steps, runs["scan"][0], runs["loop"][0], runs["scan"][1], runs["loop"][1])
