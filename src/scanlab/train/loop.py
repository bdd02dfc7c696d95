"""The chunked loop every training run shares: K steps per compiled call, a NaN stop, verified
orbax saves, Ctrl-C saving the newest whole state, and the resume rules.

A run's checkpoint holds three items: `state` (any pytree of arrays with an int32 `step`), the
per-step loss `history` and the run's `config` as a dict; `scanlab.train.run` (from-scratch
runs) and `scanlab.finetune.run` (pretrained models) each bring their state and config.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from scanlab import checks, distributed
from scanlab.checks import shown
from scanlab.errors import ArgumentError, DivergedError
from scanlab.train import checkpoints
from scanlab.train.checkpoints import CheckpointReadError


class ChunkReport(NamedTuple):
    step: int  # steps done after this chunk
    total_steps: int
    mean_loss: float  # over the chunk's steps
    steps_per_s: float  # this chunk's steps over its wall time (the first includes compilation)
    checkpointed: bool  # this step is saved: complete on disk, with its checksums
    tokens_per_s: float | None = None  # trained tokens over the chunk's wall time (fine-tuning)
    eval_loss: float | None = None  # on the held-out examples after the chunk (fine-tuning)


# (state, steps) -> (state after them, their losses (steps,)); the state is donated.
RunChunk = Callable[[Any, int], tuple[Any, jax.Array]]


def run_chunks(
    state,
    history: list[float],
    *,
    total_steps: int,
    chunk_steps: int,
    run_chunk: RunChunk,
    manager,
    config: dict,
    checkpoint_every: int,
    on_chunk: Callable[[ChunkReport], None] | None,
    describe: Callable[[Any, int, float], dict] | None = None,
):
    """Runs chunks from `state.step` to `total_steps`; returns (state, history).

    Saves (when `manager` is not None) after every `checkpoint_every` chunks and after the last;
    a chunk whose losses are not finite stops the run before anything of it is saved. Ctrl-C
    (or SIGTERM) is answered at once on stderr, then the run stops after the chunk in flight,
    saving it, and propagates; a second one stops at once, the chunk in flight not saved.
    `describe(state, steps, seconds)` adds fields to each ChunkReport.
    """
    step = int(state.step)
    if manager is not None and step < total_steps:
        checkpoints.check_room(manager, state)
    started, seconds_per_step = time.perf_counter(), None  # of the chunk in flight, the last

    def announce() -> str:
        left = ""
        if seconds_per_step is not None:
            remaining = seconds_per_step * min(chunk_steps, total_steps - step)
            left = f" (about {max(0.0, remaining - time.perf_counter() + started):.0f} s)"
        return f"stopping after this chunk{left}"

    interrupts = _Interrupts(announce)
    try:
        with interrupts.held():
            while step < total_steps:
                n = min(chunk_steps, total_steps - step)
                started = time.perf_counter()
                state, losses = _in_flight(run_chunk, state, n)
                elapsed = time.perf_counter() - started
                seconds_per_step = elapsed / n
                _check_finite(losses, step, manager)
                step += n
                history.extend(losses.tolist())
                save = manager is not None and (
                    step == total_steps or (step // chunk_steps) % checkpoint_every == 0
                )
                if save:
                    save_run(manager, step, state, history, config)
                if on_chunk is not None:
                    extra = describe(state, n, elapsed) if describe is not None else {}
                    mean = float(losses.mean())
                    report = ChunkReport(step, total_steps, mean, n / elapsed, save)
                    on_chunk(report._replace(**extra))
                if interrupts.any_signalled():  # every process stops after the same chunk
                    break
    except KeyboardInterrupt:
        if manager is not None and not interrupts.stopped_now:
            _save_interrupted(manager, config, state, history)
        raise
    return state, history


CHUNK_THREAD = "scanlab-chunk"


def chunk_running() -> bool:
    """Whether a chunk is computing on its thread, as one left by a second Ctrl-C is: the
    process must then end without Python's shutdown, which would abort inside it."""
    return any(thread.name == CHUNK_THREAD for thread in threading.enumerate())


def _in_flight(run_chunk: RunChunk, state, steps: int) -> tuple[Any, np.ndarray]:
    """(state, losses on the host) of `run_chunk(state, steps)`, run on a worker thread while
    this one waits in short sleeps: a signal's handler runs here at once, where the blocking
    calls (a chunk's compilation, the wait for its losses) would hold it until the chunk ends."""
    outcome: list = []

    def work() -> None:
        try:
            new_state, losses = run_chunk(state, steps)
            outcome.append((new_state, np.asarray(losses)))
        except BaseException as error:  # handed to the waiting thread
            outcome.append(error)

    worker = threading.Thread(target=work, name=CHUNK_THREAD, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


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


def _save_interrupted(manager, config: dict, state, history: list[float]) -> None:
    """On Ctrl-C, saves the newest state unless it is saved already.

    Signals are held while a chunk runs and is counted (`_Interrupts`), so the interrupt
    arrives between chunks: `state` is the last chunk's output, whole, and `history` counts it.
    """
    step = int(state.step)
    if step > (manager.latest_step() or 0):
        save_run(manager, step, state, history, config)


class _Interrupts:
    """Ctrl-C and SIGTERM over a run's chunks: the first is held until the chunk in flight ends
    (told at once on stderr, with `announce()`'s words), a second stops at once.

    Each chunk donates its input state: an interrupt between the donation and the output's
    return would leave no whole state to save, so the first is held. Across processes
    `any_signalled` is collective: every one learns whether any was signalled (a peer's signal
    counts as Ctrl-C here), so all stop after the same chunk — the save on the way out is
    collective too, and needs them all. The vote is taken while signals are still held: one
    arriving during it counts at the next. A second signal raises KeyboardInterrupt where the
    run stands, and `stopped_now` says that no whole state is left to save.
    """

    def __init__(self, announce: Callable[[], str]):
        self.announce = announce
        self.signals: list[int] = []
        self.stopped_now = False

    def any_signalled(self) -> bool:
        if not distributed.any_process(bool(self.signals)):
            return False
        if not self.signals:
            self.signals.append(signal.SIGINT)
        return True

    def _receive(self, number: int, _frame) -> None:
        self.signals.append(number)
        if len(self.signals) == 1:
            print(
                f"{self.announce()}; Ctrl-C again to stop now without saving it",
                file=sys.stderr,
                flush=True,
            )
            return
        self.stopped_now = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Handlers set while the block runs (only the main thread can set them: elsewhere
        signals are not held); the signals received are delivered on the way out to whatever
        handlers were there (a command's SIGTERM handler learns of its SIGTERM)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        names = (signal.SIGINT, signal.SIGTERM)
        previous = {name: signal.signal(name, self._receive) for name in names}
        try:
            yield
        finally:
            for name, handler in previous.items():
                signal.signal(name, handler)
            for number in self.signals:
                signal.raise_signal(number)


# --- a run's checkpoint -----------------------------------------------------------------------


@contextlib.contextmanager
def open_run(
    checkpoint_dir, resume: bool, resume_step: int | None, checkpoint_every: int
) -> Iterator[ocp.CheckpointManager | None]:
    """The orbax manager of a run's checkpoint directory (None without one) while the block
    runs, the arguments checked first: the directory writable (on resume too) and held for this
    run alone (`checkpoints.held`), killed saves' leftovers removed."""
    if checkpoint_every < 1:
        raise ArgumentError(f"{shown('checkpoint_every')} must be >= 1, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ArgumentError(f"{shown('resume')} needs a {shown('checkpoint_dir')}, got None")
    if resume_step is not None and not resume:
        raise ArgumentError(f"{shown('resume_step')} needs {shown('resume')}")
    if checkpoint_dir is None:
        yield None
        return
    if resume:
        checkpoints.check_exists(checkpoint_dir)  # reading must not create what it lacks
    checks.writable_dir("checkpoint_dir", checkpoint_dir)
    with checkpoints.held(checkpoint_dir):
        checkpoints.remove_partial_saves(checkpoint_dir)
        with checkpoints.open_manager(checkpoint_dir) as manager:
            yield manager


def resumed_step(manager, resume: bool, resume_step: int | None, config: dict) -> int | None:
    """The verified step a run continues from (None: a fresh start), by the resume rules.

    A directory holding a run is not started afresh; the saved config must match `config`
    except for `steps`, which may only grow; the steps after the one resumed are moved to
    `abandoned/`.
    """
    latest = manager.latest_step() if manager is not None else None
    if not resume:
        if latest is not None:
            raise ArgumentError(
                f"{shown('checkpoint_dir')} {manager.directory} already holds a run (latest step "
                f"{latest}); pass {checks.switched_on('resume')} to continue it, or choose another "
                "directory"
            )
        return None
    if latest is None:
        raise ArgumentError(
            f"{shown('checkpoint_dir')} {manager.directory} holds no complete checkpoint to resume"
        )
    step = checkpoints.verified_step(manager, resume_step, "resume_step")
    saved = saved_config(manager, step, kind_of(config))
    _check_same_config(saved, config, manager.directory)
    if config["steps"] < saved["steps"]:
        raise ArgumentError(
            f"{shown('steps')} may only grow on resume: {shown('checkpoint_dir')} "
            f"{manager.directory} plans {saved['steps']} steps, got {config['steps']}"
        )
    checkpoints.abandon_newer(manager, step)
    return step


# The kinds of run a checkpoint may hold, each told by a field only its config records.
KIND_FIELDS = {"train": "task", "finetune": "model"}


def kind_of(config: dict) -> str:
    """ "train" or "finetune": the `scanlab` command whose run wrote `config`."""
    return next((kind for kind, field in KIND_FIELDS.items() if field in config), "unknown")


def saved_config(manager, step: int, kind: str) -> dict:
    """The config a checkpoint was written with (read before the state, whose shapes it
    decides), refused in one line when the checkpoint holds another `kind` of run."""
    with checkpoints.reading(manager, step):
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = config.config
    if (found := kind_of(config)) != kind:
        directory = manager.directory
        use = {
            "train": f"read it with scanlab evaluate --checkpoint-dir {directory}",
            "finetune": f"use it with scanlab chat --model {config.get('model')} --adapter "
            f"{directory} (a base model: scanlab decoder generate, the same flags, --prompt)",
        }.get(found, "it was not written by scanlab train or finetune")
        raise checkpoints.CheckpointKindError(
            f"{directory} holds a `scanlab {found}` run, not the `scanlab {kind}` run this "
            f"needs: {use}"
        )
    return config


def restore_run(manager, step: int, target) -> tuple[Any, list[float]]:
    """(state, history) of a verified step, the state restored into `target`'s structure and
    shardings (a tree of ShapeDtypeStructs; a leaf without one goes to this process's first
    device, whatever mesh or processes wrote it)."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: (
            leaf
            if leaf.sharding is not None
            else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here)
        ),
        target,
    )
    with checkpoints.reading(manager, step):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                history=ocp.args.JsonRestore(),
            ),
        )
    # Orbax hands back plain containers in places: rebuild the exact structure.
    state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored.state))
    _check_restored_finite(state, checkpoints.step_path(manager, step))
    return state, list(restored.history)


def _check_restored_finite(state, path: Path) -> None:
    """A saved state is finite (a NaN loss stops a run before it saves): refuse one that is not,
    rather than let a resumed run blame its learning rate."""
    for where, leaf in jax.tree_util.tree_leaves_with_path(state):
        # On the devices: a leaf sharded across processes is not all in this one's memory.
        floating = jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
        if floating and not bool(jax.numpy.isfinite(leaf).all()):
            raise CheckpointReadError(
                f"checkpoint {path} holds NaN or Inf in state{jax.tree_util.keystr(where)}"
            )


def save_run(manager, step: int, state, history: list[float], config: dict) -> None:
    checkpoints.save(
        manager,
        step,
        state=ocp.args.StandardSave(state),
        history=ocp.args.JsonSave(history),
        config=ocp.args.JsonSave(config),
    )


# Fields compared by a digest instead: the model as a path, by its file's (a moved file matches).
COMPARED_BY = {"model": "model_sha256"}


def _check_same_config(saved: dict, config: dict, directory) -> None:
    """Everything but `steps` must match: a run may be extended."""

    def compared(name: str) -> bool:
        by = COMPARED_BY.get(name)
        return name != "steps" and not (by and saved.get(by) is not None and config.get(by))

    differences = [
        f"{name}={saved.get(name)!r} there, {value!r} here"
        for name, value in config.items()
        if compared(name) and saved.get(name) != value
    ]
    if differences:
        raise ArgumentError(
            f"{shown('checkpoint_dir')} {directory} was written by a different config: "
            + "; ".join(differences)
        )
