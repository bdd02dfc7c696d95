"""W15: one training run (the default tiny model, mesh data=N) as N processes of one JAX
program (gloo collectives over localhost) against one process presenting N host devices: steady
steps/s and compile time, N = 1, 2, 4.

`measure` starts the processes with `scanlab.launch` (each runs this module); process 0 prints
its figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from scanlab import distributed, launch, sharding
from scanlab.bench import env

SIZES = (1, 2, 4)
STEPS, ROUNDS = 50, 3


def measure(sizes=SIZES, steps: int = STEPS, rounds: int = ROUNDS) -> dict[str, Any]:
    """{"points": [{"devices", "way", "steps_per_s", "compile_s"}]}: for each device count,
    as that many processes of one device ("processes") and as one process ("one process")."""
    points = []
    for n in sizes:
        for way, figures in (
            ("processes", _run_launched(n, 1, steps, rounds)),
            ("one process", _run_plain(n, steps, rounds)),
        ):
            points.append(dict(devices=n, way=way, **figures))
    return {
        "date": env.describe()["date"],
        "steps_per_call": steps,
        "global_batch": _config(steps).batch_size,
        "points": points,
    }


def _config(steps: int):
    from scanlab.train import TrainConfig

    return TrainConfig(steps=1000 * steps, chunk_steps=steps)


def _run_launched(processes: int, devices: int, steps: int, rounds: int) -> dict[str, float]:
    lines: list[str] = []
    status = launch.launch(
        [str(steps), str(rounds)],
        processes,
        devices,
        write=lines.append,
        program=(sys.executable, "-m", __name__),
    )
    if status:
        raise RuntimeError(f"the {processes}-process run failed ({status}): {lines[-5:]}")
    return json.loads(next(line for line in lines if line.startswith("[0] {"))[4:])


def _run_plain(devices: int, steps: int, rounds: int) -> dict[str, float]:
    code = f"from scanlab.bench import processes; processes._worker({devices}, {steps}, {rounds})"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _worker(plain_devices: int | None, steps: int, rounds: int) -> None:
    """One process's part: join the run (or present `plain_devices`), time the chunks."""
    import jax

    settings = distributed.from_env()
    if settings is not None:
        sharding.host_devices(int(os.environ[distributed.HOST_DEVICES_ENV]))
        distributed.initialize(settings)
    elif plain_devices is not None:
        sharding.host_devices(plain_devices)
    from scanlab.train import init_state, train_chunk

    config = _config(steps)
    mesh = sharding.make_mesh(f"data={jax.device_count()}")
    times = []
    for _ in range(rounds + 1):
        state = init_state(config, mesh)
        jax.block_until_ready(state)
        start = time.perf_counter()
        _, losses = train_chunk(state, config=config, steps=steps, mesh=mesh)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    if distributed.is_primary():
        print(json.dumps({"steps_per_s": steps / steady, "compile_s": times[0] - steady}))


if __name__ == "__main__":
    _worker(None, int(sys.argv[1]), int(sys.argv[2]))
