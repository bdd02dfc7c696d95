"""Runs every workload in one process and gathers the figures (see `report` for the write-up)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from scanlab import sharding
from scanlab.bench import (
    decoding,
    env,
    finetuning,
    gemma3,
    generation,
    layers,
    loops,
    nnx,
    processes,
    recurrence,
    scaling,
    serving,
    training,
)
from scanlab.checks import shown
from scanlab.decoder import REMAT
from scanlab.errors import ArgumentError, MissingPathError
from scanlab.train import TrainConfig, train_chunk


class _RealModelWorkload(NamedTuple):
    key: str  # its figures' key in the results
    title: str
    measure: Callable[[Callable[[str], None]], dict]  # on_progress -> figures


# The workloads that load real models (minutes each): left out of quick runs; `rerun` measures
# them anew into a full run's results.
REAL_MODEL_WORKLOADS = {
    "W7": _RealModelWorkload(
        "decoding",
        "decoding the real model (SmolLM2-135M-Instruct)",
        lambda on_progress: decoding.measure(),
    ),
    "W13": _RealModelWorkload(
        "gemma3",
        "Gemma 3 270M: decoding, ring caches at long contexts, compile time",
        lambda on_progress: gemma3.measure(),
    ),
    "W14": _RealModelWorkload(
        "finetuning",
        "fine-tuning the real model: scanned chunks, a loop, transformers + PEFT",
        lambda on_progress: finetuning.measure(),
    ),
    "W16": _RealModelWorkload(
        "serving",
        "many users at once: scanlab serve against llama-server",
        lambda on_progress: serving.measure(on_progress=on_progress),
    ),
    "W17": _RealModelWorkload(
        "sizes",
        "real sizes: GGUF files of 135M–8B against llama.cpp",
        lambda on_progress: scaling.measure(on_progress=on_progress),
    ),
}


def full_run_to_update(out: Path, only: str, quick: bool) -> tuple[dict, list[str]]:
    """The results in `out` of an earlier full run, and the `REAL_MODEL_WORKLOADS` that `only`
    names (comma-separated), checked before any measuring."""
    names = [name.strip() for name in only.split(",")]
    if not set(names) <= set(REAL_MODEL_WORKLOADS):
        raise ArgumentError(
            f"{shown('only')} must name some of {', '.join(REAL_MODEL_WORKLOADS)}, "
            f"comma-separated, got {only!r}"
        )
    if quick:
        raise ArgumentError(f"{shown('only')} updates a full run's figures: leave out --quick")
    path = out / "results.json"
    if not path.is_file():
        raise MissingPathError(
            f"{shown('only')} updates a full run's results.json, got none in {str(out)!r}: "
            "run the whole benchmark there first"
        )
    results = json.loads(path.read_text())
    if results.get("quick", True):
        raise ArgumentError(
            f"{shown('only')} updates a full run's figures, got {str(path)!r}, a quick run's"
        )
    return results, names


def rerun(
    results: dict, workloads: Sequence[str], on_progress: Callable[[str], None] = lambda m: None
) -> dict:
    """`results` (a full run's) with the named `REAL_MODEL_WORKLOADS` measured anew."""
    results = dict(results)
    for name in workloads:
        workload = REAL_MODEL_WORKLOADS[name]
        on_progress(f"{name} {workload.title}")
        results[workload.key] = workload.measure(on_progress)
    return results


def run(quick: bool = False, on_progress: Callable[[str], None] = lambda message: None) -> dict:
    """All workloads, W1–W17; `quick` shrinks each to a smoke test of a few seconds and leaves
    out `REAL_MODEL_WORKLOADS`."""
    results: dict = {"quick": quick, "env": env.describe()}
    n_devices = len(results["env"]["devices"])

    on_progress("W1 seed-function call latency")
    results["latency"] = recurrence.call_latency(
        *(16, 50) if quick else (64, 1000), repeats=5 if quick else 50
    )._asdict()

    on_progress("machine limit: matmul FLOP/s")
    results["matmul_flops"] = recurrence.matmul_rate(256 if quick else 2048)

    results["recurrence"] = []
    for shape in recurrence.QUICK_SHAPES if quick else recurrence.SHAPES:
        on_progress(f"W2 recurrence B={shape.B} H={shape.H} T={shape.T}")
        for timing in recurrence.measure(
            shape, n_devices, repeats=2 if quick else 5, budget_s=0.1 if quick else 2.0
        ):
            results["recurrence"].append(timing._asdict() | {"shape": shape._asdict()})

    results["layers"], results["remat"] = [], []
    for n_layers in (2,) if quick else (4, 8, 16, 32, 64):
        on_progress(f"W3 scan vs loop over {n_layers} layers")
        dims = dict(d_model=32, seq=16) if quick else {}
        point = layers.measure(
            n_layers, repeats=2 if quick else 5, compiles=1 if quick else 3, **dims
        )
        results["layers"].append(point._asdict())
        remat = layers.measure_remat(
            n_layers,
            **dims,
            repeats=1 if quick else 3,
            policies=("none", "full") if quick else tuple(REMAT),
        )
        results["remat"] += [p._asdict() for p in remat]

    results["training"] = {}
    # Quick runs give it a batch of 2, so that W6 can split it and reuse its compiled chunk.
    small = TrainConfig(
        steps=300,
        batch_size=2 if quick else 1,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        mlp_dim=32,
    )
    models = {"dispatch-bound model": small}
    if not quick:
        models = {"default tiny model": TrainConfig()} | models
    for name, config in models.items():
        on_progress(f"W4 training: {name}")
        steps = 20 if quick else 200
        results["training"][name] = training.measure(
            config, steps=steps, repeats=1 if quick else 3
        )._asdict()

    results["sharding"] = []
    if n_devices > 1:
        mesh = sharding.make_mesh(f"data={n_devices}")
        on_progress(f"W6 the scanned forward and training on {n_devices} devices")
        dims = dict(d_model=32, seq=16, batch=n_devices) if quick else dict(batch=8)
        single = layers.measure_sharded(2 if quick else 16, sharding.make_mesh("data=1"), **dims)
        sharded = layers.measure_sharded(2 if quick else 16, mesh, **dims)
        steps = 20 if quick else 200
        config = small if quick else TrainConfig()
        results["sharding"] = {
            "forward": {"one device": single._asdict(), "mesh": sharded._asdict(), **dims},
            "training": {  # the scanned chunk only: W4 compares it with the loop
                where: {
                    "scan_steps_per_s": training.steps_per_s(train_chunk, config, steps, 1, on)[0]
                }
                for where, on in (("one device", None), ("mesh", mesh))
            },
            "mesh": dict(mesh.shape),
        }

    results["generation"] = []
    for batch in (1,) if quick else (1, 8):
        on_progress(f"W5 generation, batch {batch}")
        dims = dict(new_tokens=8, n_layers=2, d_model=32, repeats=1) if quick else {}
        results["generation"].append(generation.measure(batch=batch, **dims)._asdict())
    if not quick:
        results = rerun(results, list(REAL_MODEL_WORKLOADS), on_progress)
    results["loops"] = _loops(quick, on_progress)
    on_progress("W15 one training run as 1, 2 and 4 processes (jax.distributed, gloo)")
    results["processes"] = (
        processes.measure(sizes=(1, 2), steps=5, rounds=1) if quick else processes.measure()
    )

    results["nnx"] = {"recurrence": [], "layers": []}
    for B, H, T in ((1, 16, 50),) if quick else ((1, 64, 1000), (64, 256, 1000)):
        on_progress(f"W12 recurrence in linen and NNX, B={B} H={H} T={T}")
        for form in nnx.recurrence_forms(B, H, T, rounds=2 if quick else 9):
            results["nnx"]["recurrence"].append(form._asdict() | dict(B=B, H=H, T=T))
    n_layers = 2 if quick else 16
    on_progress(f"W12 layer stack, functional vs NNX, {n_layers} layers")
    dims = dict(d_model=32, seq=16, rounds=2) if quick else {}
    results["nnx"]["layers"] = [
        timing._asdict() | dict(n_layers=n_layers)
        for timing in nnx.layer_stack_forms(n_layers, **dims)
    ]
    return results


def _loops(quick: bool, on_progress: Callable[[str], None]) -> dict:
    """W8–W11, the scanlab.loops workloads."""
    rounds = 2 if quick else 7
    figures: dict = {"masked": [], "while": [], "remat": [], "linear": []}
    for B, H, T in ((1, 16, 50),) if quick else ((1, 64, 1000), (64, 256, 1000), (8, 256, 10000)):
        on_progress(f"W8 masked_scan B={B} H={H} T={T}")
        figures["masked"].append(loops.masked_overhead(B, H, T, rounds)._asdict())
    for taken, max_steps in ((5, 50),) if quick else ((100, 1000), (1000, 1000), (10, 10000)):
        on_progress(f"W9 bounded_while {taken} of {max_steps} steps")
        figures["while"].append(loops.while_costs(taken, max_steps, rounds=rounds)._asdict())
    for T in (100, 400) if quick else (1000, 3000, 10_000, 30_000, 100_000):
        on_progress(f"W10 gradient memory per remat policy, T={T}")
        figures["remat"] += [p._asdict() for p in loops.remat_memory(T, time_it=not quick)]
    for T in (64,) if quick else (256, 4096, 65536):
        for D in (1, 4) if quick else (1, 16, 256):
            on_progress(f"W11 linear_scan T={T} D={D}")
            figures["linear"].append(loops.linear_regime(T, D, rounds)._asdict())
    return figures
