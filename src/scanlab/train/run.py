"""A long training run as a sequence of scanned chunks, checkpointed with orbax, resumable.

Checkpoints hold the whole TrainState (params, optimizer state, key, step), the loss history and
the TrainConfig, each step with the checksums of its files (`scanlab.train.checkpoints`): a step
is reported saved once it is complete on disk, and read only after it verifies.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from scanlab import checks
from scanlab.checks import shown
from scanlab.errors import ArgumentError, DivergedError
from scanlab.train import checkpoints
from scanlab.train.checkpoints import CheckpointReadError
from scanlab.train.config import TrainConfig
from scanlab.train.step import TrainState, init_state, state_shardings, train_chunk


class ChunkReport(NamedTuple):
    step: int  # steps done after this chunk
    total_steps: int
    mean_loss: float  # over the chunk's steps
    steps_per_s: float  # this chunk's steps over its wall time (the first includes compilation)
    checkpointed: bool  # this step is saved: complete on disk, with its checksums


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
    if checkpoint_every < 1:
        raise ArgumentError(f"{shown('checkpoint_every')} must be >= 1, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ArgumentError(f"{shown('resume')} needs a {shown('checkpoint_dir')}, got None")
    if resume_step is not None and not resume:
        raise ArgumentError(f"{shown('resume_step')} needs {shown('resume')}")
    if checkpoint_dir is not None:
        if resume:
            checkpoints.check_exists(checkpoint_dir)  # reading must not create what it lacks
        checks.writable_dir("checkpoint_dir", checkpoint_dir)
        checkpoints.remove_partial_saves(checkpoint_dir)  # killed saves' leftovers
    manager = checkpoints.open_manager(checkpoint_dir) if checkpoint_dir is not None else None
    state, losses, history = None, None, list[float]()
    try:
        state, history = _starting_point(config, manager, resume, resume_step, mesh)
        step = int(state.step)
        while step < config.steps:
            n = min(config.chunk_steps, config.steps - step)
            start = time.perf_counter()
            with _interrupts_held():
                state, losses = train_chunk(state, config=config, steps=n, mesh=mesh)
            losses = np.asarray(losses)  # waits for the chunk
            elapsed = time.perf_counter() - start
            _check_finite(losses, step, manager)
            step += n
            history.extend(losses.tolist())
            save = manager is not None and (
                step == config.steps or (step // config.chunk_steps) % checkpoint_every == 0
            )
            if save:
                _save(manager, step, config, state, history)
            if on_chunk is not None:
                on_chunk(ChunkReport(step, config.steps, float(losses.mean()), n / elapsed, save))
    except KeyboardInterrupt:
        if manager is not None:
            _save_interrupted(manager, config, state, losses, history)
        raise
    finally:
        if manager is not None:
            manager.close()
    return TrainResult(config, state, np.asarray(history, np.float32))


def saved_config(checkpoint_dir: str | Path, step: int | None = None) -> TrainConfig:
    """The TrainConfig of the newest checkpoint in `checkpoint_dir` (or of `step`), verified."""
    checkpoints.check_exists(checkpoint_dir)
    with checkpoints.open_manager(checkpoint_dir) as manager:
        step = checkpoints.verified_step(manager, step, "resume_step")
        return TrainConfig(**_saved_config(manager, step))


def _check_finite(losses: np.ndarray, step: int, manager) -> None:
    """Stops a run whose loss became NaN or Inf, before anything of the bad chunk is saved."""
    bad = ~np.isfinite(losses)
    if bad.any():
        kept = manager.latest_step() if manager is not None else None
        where = f"; the last good checkpoint (step {kept}) is kept" if kept is not None else ""
        raise DivergedError(
            f"the loss became {losses[bad][0]} at step {step + int(np.argmax(bad)) + 1}: "
            f"training stopped{where}. Lower learning_rate or clip_norm."
        )


def load(
    checkpoint_dir: str | Path, mesh: Mesh | None = None, step: int | None = None
) -> TrainResult:
    """The newest checkpoint of a run (or `step`), verified: its config, state and loss history,
    placed on `mesh` if one is given, whatever mesh it was written from."""
    checkpoints.check_exists(checkpoint_dir)
    with checkpoints.open_manager(checkpoint_dir) as manager:
        step = checkpoints.verified_step(manager, step, "step")
        config = TrainConfig(**_saved_config(manager, step))
        state, history = _restore(manager, step, config, mesh)
    return TrainResult(config, state, np.asarray(history, np.float32))


def _save_interrupted(manager, config: TrainConfig, state, losses, history: list[float]) -> None:
    """On Ctrl-C, saves the newest state that is whole, so at most the chunk in flight is lost.

    Each chunk donates its input state, so the newest whole state is the last chunk's output:
    saved with the history up to it (its losses included when that chunk had not yet been
    counted). A state already handed to the next chunk (deleted) cannot be saved.
    """
    if state is None or any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
        return
    step = int(state.step)  # waits for the chunk that produced it
    if step != len(history) and losses is not None and step == len(history) + len(losses):
        history = history + np.asarray(losses).tolist()
    if step == len(history) and step > (manager.latest_step() or 0):
        _save(manager, step, config, state, history)


@contextlib.contextmanager
def _interrupts_held():
    """Holds Ctrl-C and SIGTERM back while a chunk is dispatched, then delivers them.

    The chunk donates its input state: an interrupt between the donation and the output's
    return would leave no whole state to save. Held signals are raised again once the output
    is assigned, to whatever handlers were there (only the main thread can set handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda number, _: held.append(number)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in held:
            signal.raise_signal(number)


def _starting_point(config, manager, resume: bool, resume_step, mesh):
    """(state, loss history) to start from: fresh, or a verified checkpoint's."""
    latest = manager.latest_step() if manager is not None else None
    if not resume:
        if latest is not None:
            raise ArgumentError(
                f"{shown('checkpoint_dir')} {manager.directory} already holds a run (latest step "
                f"{latest}); pass resume=True (--resume) to continue it, or choose another "
                "directory"
            )
        return init_state(config, mesh), []
    if latest is None:
        raise ArgumentError(
            f"{shown('checkpoint_dir')} {manager.directory} holds no complete checkpoint to resume"
        )
    step = checkpoints.verified_step(manager, resume_step, "resume_step")
    _check_same_config(_saved_config(manager, step), config, manager.directory)
    if config.steps < step:
        raise ArgumentError(
            f"{shown('steps')} must be >= {step} to resume {shown('checkpoint_dir')} "
            f"{manager.directory} (the run has done {step} steps), got {config.steps}"
        )
    checkpoints.abandon_newer(manager, step)
    return _restore(manager, step, config, mesh)


def _saved_config(manager, step: int) -> dict:
    """The TrainConfig a checkpoint was written with, as a dict (read before the state, whose
    shapes it decides)."""
    with checkpoints.reading(manager, step):
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def _restore(manager, step: int, config: TrainConfig, mesh) -> tuple[TrainState, list[float]]:
    target = jax.eval_shape(lambda: init_state(config))
    if mesh is not None:  # restore each array straight into its layout on this mesh
        target = jax.tree.map(
            lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
            target,
            state_shardings(config, mesh),
        )
    with checkpoints.reading(manager, step):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                history=ocp.args.JsonRestore(),
            ),
        )
    # Orbax hands back plain containers in places: rebuild the exact NamedTuple structure.
    state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored.state))
    _check_restored_finite(state, checkpoints.step_path(manager, step))
    return state, list(restored.history)


def _check_restored_finite(state: TrainState, path: Path) -> None:
    """A saved state is finite (a NaN loss stops a run before it saves): refuse one that is not,
    rather than let a resumed run blame its learning rate."""
    for where, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and not np.isfinite(leaf).all():
            raise CheckpointReadError(
                f"checkpoint {path} holds NaN or Inf in state{jax.tree_util.keystr(where)}"
            )


def _save(manager, step: int, config: TrainConfig, state: TrainState, history: list[float]):
    checkpoints.save(
        manager,
        step,
        state=ocp.args.StandardSave(state),
        history=ocp.args.JsonSave(history),
        config=ocp.args.JsonSave(config.to_dict()),
    )


def _check_same_config(saved: dict, config: TrainConfig, directory) -> None:
    """Everything but `steps` must match: a run may be extended (see `train`)."""
    current = config.to_dict()
    current.pop("steps")
    differences = [
        f"{name}={saved.get(name)!r} there, {value!r} here"
        for name, value in current.items()
        if saved.get(name) != value
    ]
    if differences:
        raise ArgumentError(
            f"{shown('checkpoint_dir')} {directory} was written by a different config: "
            + "; ".join(differences)
        )
