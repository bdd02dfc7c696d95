"""A long training run as a sequence of scanned chunks, checkpointed with orbax, resumable.

Checkpoints hold the whole TrainState (params, optimizer state, key, step), the loss history and
the TrainConfig, each step with the checksums of its files (`scanlab.train.checkpoints`): a step
is reported saved once it is complete on disk, and read only after it verifies. The loop and the
resume rules are `scanlab.train.loop`'s, shared with fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from scanlab import checks
from scanlab.train import checkpoints, loop
from scanlab.train.config import TrainConfig
from scanlab.train.loop import ChunkReport
from scanlab.train.step import TrainState, init_state, state_shardings, train_chunk


class TrainResult(NamedTuple):
    config: TrainConfig
    state: TrainState
    losses: np.ndarray  # (steps,) per-step loss, from step 1, across resumes


def train(
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 5,
    resume: bool = False,
    resume_step: int | None = None,
    on_chunk: Callable[[ChunkReport], None] | None = None,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Runs `config.steps` steps, `config.chunk_steps` per compiled `lax.scan` call.

    Args:
      config: the run.
      checkpoint_dir: where orbax checkpoints go; None for no checkpoints. It must be writable
        (checked before training, on resume too).
      checkpoint_every: save after every this many chunks, and after the last. A save that fails
        stops the run with CheckpointWriteError; the steps saved before are kept.
      resume: continue from the newest checkpoint in `checkpoint_dir`: the same config,
        except that `steps` may be raised to extend the run. The learning-rate schedule is then
        the one of the longer plan from the next step on (warm-up done, the cosine decay
        stretched to the new end), so the rate steps up at the point of extension. A checkpoint
        that does not match its checksums is refused, naming the newest step that does.
      resume_step: with `resume`, continue from this saved step instead of the newest (e.g. the
        newest one that verifies); the steps after it are moved to `checkpoint_dir/abandoned/`.
      on_chunk: called after each chunk, e.g. to draw progress.
      mesh: run data- and tensor-parallel on this ("data", "model") mesh; checkpoints written
        on one mesh resume on another.
    """
    checks.instance("config", config, TrainConfig, "e.g. TrainConfig(steps=20)")
    with loop.open_run(checkpoint_dir, resume, resume_step, checkpoint_every) as manager:
        step = loop.resumed_step(manager, resume, resume_step, config.to_dict())
        history: list[float] = []
        if step is None:
            state = init_state(config, mesh)
        else:
            state, history = _restore(manager, step, config, mesh)
        state, history = loop.run_chunks(
            state,
            history,
            total_steps=config.steps,
            chunk_steps=config.chunk_steps,
            run_chunk=lambda s, n: train_chunk(
                s, config=config, steps=n, mesh=mesh, length=config.chunk_steps
            ),
            manager=manager,
            config=config.to_dict(),
            checkpoint_every=checkpoint_every,
            on_chunk=on_chunk,
        )
    return TrainResult(config, state, np.asarray(history, np.float32))


def saved_config(checkpoint_dir: str | Path, step: int | None = None) -> TrainConfig:
    """The TrainConfig of the newest checkpoint in `checkpoint_dir` (or of `step`), verified."""
    checkpoints.check_exists(checkpoint_dir)
    with checkpoints.open_manager(checkpoint_dir) as manager:
        step = checkpoints.verified_step(manager, step, "resume_step")
        return TrainConfig(**loop.saved_config(manager, step, "train"))


def load(
    checkpoint_dir: str | Path, mesh: Mesh | None = None, step: int | None = None
) -> TrainResult:
    """The newest checkpoint of a run (or `step`), verified: its config, state and loss history,
    placed on `mesh` if one is given, whatever mesh it was written from."""
    checkpoints.check_exists(checkpoint_dir)
    with checkpoints.open_manager(checkpoint_dir) as manager:
        step = checkpoints.verified_step(manager, step, "step")
        config = TrainConfig(**loop.saved_config(manager, step, "train"))
        state, history = _restore(manager, step, config, mesh)
    return TrainResult(config, state, np.asarray(history, np.float32))


def _restore(manager, step: int, config: TrainConfig, mesh) -> tuple[TrainState, list[float]]:
    target = jax.eval_shape(lambda: init_state(config))
    if mesh is not None:  # restore each array straight into its layout on this mesh
        target = jax.tree.map(
            lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
            target,
            state_shardings(config, mesh),
        )
    return loop.restore_run(manager, step, target)
