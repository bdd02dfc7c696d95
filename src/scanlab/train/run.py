"""A long training run as a sequence of scanned chunks, checkpointed with orbax, resumable.

Checkpoints hold the whole TrainState (params, optimizer state, key, step), the loss history and
the TrainConfig. Orbax writes each one under a temporary name and renames it when complete, so a
save killed half-way leaves a directory that `latest_step` ignores: resume uses the last complete
checkpoint.
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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from scanlab.errors import ArgumentError, DivergedError, MissingPathError, ScanlabError
from scanlab.train.config import TrainConfig
from scanlab.train.step import TrainState, init_state, state_shardings, train_chunk


class ChunkReport(NamedTuple):
    step: int  # steps done after this chunk
    total_steps: int
    mean_loss: float  # over the chunk's steps
    steps_per_s: float  # this chunk's steps over its wall time (the first includes compilation)
    checkpointed: bool


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
    on_chunk: Callable[[ChunkReport], None] | None = None,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Runs `config.steps` steps, `config.chunk_steps` per compiled `lax.scan` call.

    Args:
      config: the run.
      checkpoint_dir: where orbax checkpoints go; None for no checkpoints.
      checkpoint_every: save after every this many chunks, and after the last.
      resume: continue from the last complete checkpoint in `checkpoint_dir`: the same config,
        except that `steps` may be raised to extend the run. The learning-rate schedule is then
        the one of the longer plan from the next step on (warm-up done, the cosine decay
        stretched to the new end), so the rate steps up at the point of extension.
      on_chunk: called after each chunk, e.g. to draw progress.
      mesh: run data- and tensor-parallel on this ("data", "model") mesh; checkpoints written
        on one mesh resume on another.
    """
    if checkpoint_every < 1:
        raise ArgumentError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ArgumentError("resume needs a checkpoint_dir, got None")
    if resume and checkpoint_dir is not None:
        _check_exists(checkpoint_dir)  # reading must not create what it fails to find
    manager = _manager(checkpoint_dir) if checkpoint_dir is not None else None
    state, losses, history = None, None, list[float]()
    try:
        state, history = _starting_point(config, manager, resume, mesh)
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
            manager.wait_until_finished()
            manager.close()
    return TrainResult(config, state, np.asarray(history, np.float32))


def saved_config(checkpoint_dir: str | Path) -> TrainConfig:
    """The TrainConfig of the last complete checkpoint in `checkpoint_dir`."""
    _check_exists(checkpoint_dir)
    with _manager(checkpoint_dir) as manager:
        step = manager.latest_step()
        if step is None:
            raise ArgumentError(f"checkpoint_dir {checkpoint_dir} holds no complete checkpoint")
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


def load(checkpoint_dir: str | Path, mesh: Mesh | None = None) -> TrainResult:
    """The last complete checkpoint of a run (its config, state and loss history), placed on
    `mesh` if one is given, whatever mesh it was written from."""
    _check_exists(checkpoint_dir)
    with _manager(checkpoint_dir) as manager:
        step = manager.latest_step()
        if step is None:
            raise ArgumentError(f"checkpoint_dir {checkpoint_dir} holds no complete checkpoint")
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


def _check_exists(checkpoint_dir: str | Path) -> None:
    if not Path(checkpoint_dir).is_dir():
        raise MissingPathError(f"checkpoint_dir {checkpoint_dir} does not exist")


def _manager(checkpoint_dir: str | Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(checkpoint_dir).absolute(), options=options)


def _starting_point(config, manager, resume: bool, mesh) -> tuple[TrainState, list[float]]:
    latest = manager.latest_step() if manager is not None else None
    if not resume:
        if latest is not None:
            raise ArgumentError(
                f"checkpoint_dir {manager.directory} already holds a run (latest step {latest}); "
                "pass resume=True (--resume) to continue it, or choose another directory"
            )
        return init_state(config, mesh), []
    if latest is None:
        raise ArgumentError(
            f"checkpoint_dir {manager.directory} holds no complete checkpoint to resume"
        )
    _check_same_config(_saved_config(manager, latest), config, manager.directory)
    if config.steps < latest:
        raise ArgumentError(
            f"steps must be >= {latest} to resume checkpoint_dir {manager.directory} (the run "
            f"has done {latest} steps), got {config.steps}"
        )
    return _restore(manager, latest, config, mesh)


class CheckpointReadError(ScanlabError, ValueError):
    """A checkpoint on disk is damaged or incomplete: which one, and what orbax said."""


@contextlib.contextmanager
def _reading(manager, step: int):
    # Orbax and TensorStore raise bare Exceptions (or KeyError for a missing item) with pages of
    # detail: name the checkpoint and keep the first sentence.
    try:
        yield
    except Exception as error:
        summary = str(error).splitlines()[0].split(" See full TensorStore details")[0]
        raise CheckpointReadError(
            f"checkpoint {Path(manager.directory) / str(step)} cannot be read "
            f"({type(error).__name__}: {summary.strip()[:300]})"
        ) from None


def _saved_config(manager, step: int) -> dict:
    """The TrainConfig a checkpoint was written with, as a dict (read before the state, whose
    shapes it decides)."""
    with _reading(manager, step):
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def _restore(manager, step: int, config: TrainConfig, mesh) -> tuple[TrainState, list[float]]:
    target = jax.eval_shape(lambda: init_state(config))
    if mesh is not None:  # restore each array straight into its layout on this mesh
        target = jax.tree.map(
            lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
            target,
            state_shardings(config, mesh),
        )
    with _reading(manager, step):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                history=ocp.args.JsonRestore(),
            ),
        )
    # Orbax hands back plain containers in places: rebuild the exact NamedTuple structure.
    state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored.state))
    return state, list(restored.history)


def _save(manager, step: int, config: TrainConfig, state: TrainState, history: list[float]):
    # A copy: the save runs asynchronously, and the next chunk donates (overwrites) `state`.
    snapshot = jax.tree.map(jnp.copy, state)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(snapshot),
            history=ocp.args.JsonSave(history),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
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
            f"checkpoint_dir {directory} was written by a different config: "
            + "; ".join(differences)
        )
