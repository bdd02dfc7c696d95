"""Checkpoints that prove themselves: orbax steps written synchronously, each with the SHA-256 of
every file it holds, verified before anything of it is read.

Orbax writes a step under a temporary name and renames it when complete; scanlab then writes the
step's checksums (`MANIFEST`) beside its items and only then calls the step saved. A step without
checksums was cut off between the two and counts as unsaved. Verifying before orbax reads means a
damaged file is named (not read into NaN weights or silently different ones), and orbax's
concurrent readers never meet it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from scanlab import distributed
from scanlab.checks import shown
from scanlab.errors import MissingPathError, ScanlabError

MANIFEST = "scanlab-sha256.json"
# Held (flock) by the run writing the directory, naming it: a second run is refused.
LOCK = "scanlab-run.lock"
# Steps newer than the one a run resumes from are moved here, not deleted: nothing is lost.
ABANDONED = "abandoned"
MAX_TO_KEEP = 3


class CheckpointReadError(ScanlabError, ValueError):
    """A checkpoint on disk is damaged or incomplete: which one, and what was found."""


class CheckpointWriteError(ScanlabError, OSError):
    """A checkpoint could not be written: where, and the system's reason."""


class CheckpointKindError(ScanlabError, ValueError):
    """A checkpoint holds another kind of run than the one asked for (training, fine-tuning)."""


class CheckpointInUseError(ScanlabError, OSError):
    """Another run is writing the checkpoint directory."""


@contextlib.contextmanager
def held(directory: str | Path) -> Iterator[None]:
    """Holds `directory` for one run while the block runs: a second run into it, from any
    process of this machine, is refused naming the holder (two runs would each save and report
    success while the directory kept one of them). Across processes of one run the first holds
    it for all. The lock ends with the process, however it ends."""
    if not distributed.is_primary():
        yield
        return
    with open(Path(directory) / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not said which"
            raise CheckpointInUseError(
                f"{shown('checkpoint_dir')} {directory} is in use by another run ({holder}): "
                "wait for it to end, or choose another directory"
            ) from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_manager(directory: str | Path) -> ocp.CheckpointManager:
    """An orbax manager over `directory`: synchronous saves (a save returns once it is on disk),
    the newest `MAX_TO_KEEP` steps kept."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=MAX_TO_KEEP, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def remove_partial_saves(directory: str | Path) -> None:
    """Removes orbax's temporary directories of saves that never completed, here rather than by
    orbax's own clean-up, which runs in a thread a quick exit cuts short (across processes: the
    first does it, the others wait)."""
    if distributed.is_primary():
        _remove_partials(directory, None)
    distributed.barrier(f"scanlab-cleaned-{directory}")


def _remove_partials(directory: str | Path, step: int | None) -> None:
    pattern = f"{'*' if step is None else step}.orbax-checkpoint-tmp*"
    for partial in Path(directory).glob(pattern):
        shutil.rmtree(partial, ignore_errors=True)


def check_exists(directory: str | Path, name: str = "checkpoint_dir") -> None:
    """Reading must not create what it fails to find."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise MissingPathError(f"{shown(name)} {directory} is a file, not a checkpoint directory")
    if not Path(directory).is_dir():
        raise MissingPathError(f"{shown(name)} {directory} does not exist")


def step_path(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(manager.directory) / str(step)


def save(manager: ocp.CheckpointManager, step: int, **items: ocp.args.CheckpointArgs) -> None:
    """Writes `step` (orbax items by name) and its checksums; returns once both are on disk.

    A failed save removes what it wrote and raises CheckpointWriteError naming the path and the
    cause; the steps saved before are kept.
    """
    path = step_path(manager, step)
    _check_space(manager, step, items)
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        _write_manifest(path)  # by the first process, once every process's shards are written
    except Exception as error:  # OSError, or orbax/TensorStore's bare Exceptions wrapping one
        _remove_partials(manager.directory, step)  # no barrier: a peer may not have failed
        shutil.rmtree(path, ignore_errors=True)
        manager.reload()
        raise _write_error(manager, step, _summary(error)) from None


# Beyond the items' own bytes: orbax's metadata, the checksums, a filesystem block per file.
SAVE_OVERHEAD_BYTES = 512 * 1024


def _shortfall(manager, items: list) -> tuple[float, float] | None:
    """(MiB needed, MiB free) when the manager's filesystem cannot hold a save of `items`."""
    needed = SAVE_OVERHEAD_BYTES + sum(_item_bytes(item) for item in items)
    free = shutil.disk_usage(manager.directory).free
    return (needed / 2**20, free / 2**20) if free < needed else None


def _check_space(manager, step: int, items: dict) -> None:
    """Refuses a save the filesystem cannot hold before orbax starts writing: a save that fails
    half-way through orbax leaves its writer threads reporting the failure for seconds."""
    if short := _shortfall(manager, [arg.item for arg in items.values()]):
        needed, free = short
        raise _write_error(
            manager, step, f"it needs about {needed:.1f} MiB, {free:.1f} MiB are free"
        )


def check_room(manager, state) -> None:
    """Refuses, before the first chunk, a run whose checkpoint (`state`'s bytes) cannot fit
    where it goes."""
    if short := _shortfall(manager, [state]):
        needed, free = short
        raise CheckpointWriteError(
            f"{shown('checkpoint_dir')} {manager.directory} has {free:.1f} MiB free, "
            f"and a checkpoint of this run needs about {needed:.1f} MiB"
        )


def _write_error(manager, step: int, cause: str) -> CheckpointWriteError:
    kept = manager.latest_step()
    return CheckpointWriteError(
        f"checkpoint {step_path(manager, step)} could not be saved ({cause}); "
        + (f"step {kept} is kept" if kept is not None else "no earlier step was saved")
    )


def _item_bytes(item) -> int:
    leaves = jax.tree.leaves(item)
    if all(hasattr(leaf, "nbytes") for leaf in leaves):
        return sum(leaf.nbytes for leaf in leaves)
    return len(json.dumps(item))


def verified_step(
    manager: ocp.CheckpointManager,
    step: int | None,
    name: str,
    directory_name: str = "checkpoint_dir",
) -> int:
    """`step`, or the newest saved step, after checking every file against its checksum.

    Raises CheckpointReadError naming the step and its damage, and the newest step that does
    verify (to pass as `name`), if any; the directory is `directory_name` in messages.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointReadError(
            f"{shown(directory_name)} {manager.directory} holds no complete checkpoint"
        )
    if step is None:
        step = steps[0]
    elif step not in steps:
        raise CheckpointReadError(
            f"{shown(name)} must be a saved step of {manager.directory}, one of "
            f"{sorted(steps)}, got {step}"
        )
    damage = _damage(step_path(manager, step))
    if damage is None:
        return step
    older = next((s for s in steps if s < step and _damage(step_path(manager, s)) is None), None)
    offer = (
        f"; step {older} verifies: pass {shown(name)} {older} to read it"
        if older is not None
        else "; no older step verifies"
    )
    raise CheckpointReadError(f"checkpoint {step_path(manager, step)} {damage}{offer}")


def abandon_newer(manager: ocp.CheckpointManager, step: int) -> list[int]:
    """Moves the steps after `step` into ABANDONED/ (a run resumed from `step` writes its own);
    returns them."""
    newer = sorted(s for s in manager.all_steps() if s > step)
    for later in newer if distributed.is_primary() else ():
        destination = Path(manager.directory) / ABANDONED / str(later)
        suffix = 1
        while destination.exists():
            destination = destination.with_name(f"{later}.{suffix}")
            suffix += 1
        destination.parent.mkdir(exist_ok=True)
        step_path(manager, later).rename(destination)
    distributed.barrier(f"scanlab-abandoned-{manager.directory}-{step}")
    manager.reload()
    return newer


@contextlib.contextmanager
def reading(manager: ocp.CheckpointManager, step: int):
    """Orbax and TensorStore raise bare Exceptions (or KeyError for a missing item) with pages
    of detail: name the checkpoint and keep the first sentence."""
    try:
        yield
    except Exception as error:
        raise CheckpointReadError(
            f"checkpoint {step_path(manager, step)} cannot be read "
            f"({type(error).__name__}: {_summary(error)})"
        ) from None


def _summary(error: Exception) -> str:
    """The operating system's reason where one is in the chain (TensorStore's messages hold it as
    os_error_code, after a page of spec), else the first sentence."""
    chain: Exception | None = error
    while chain is not None:
        if isinstance(chain, OSError) and chain.strerror:
            return f"[Errno {chain.errno}] {chain.strerror}"
        code = re.search(r"os_error_code='(\d+)'", str(chain))
        if code:
            return f"[Errno {code[1]}] {os.strerror(int(code[1]))}"
        chain = chain.__cause__ or chain.__context__  # type: ignore[assignment]
    text = str(error) or repr(error)
    return text.splitlines()[0].split(" See full TensorStore details")[0].strip()[:300]


def _files(path: Path) -> dict[str, Path]:
    return {
        str(file.relative_to(path)): file
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }


def _sha256(file: Path) -> str:
    with file.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_manifest(path: Path) -> None:
    """The step's checksums, written under a temporary name and renamed: all or nothing. Across
    processes the first writes them, between barriers: after every shard, before any read."""
    distributed.barrier(f"scanlab-save-{path}")
    if distributed.is_primary():
        digests = {name: _sha256(file) for name, file in _files(path).items()}
        partial = path / f".{MANIFEST}.partial"
        partial.write_text(json.dumps(digests, indent=1, sort_keys=True))
        partial.rename(path / MANIFEST)
    distributed.barrier(f"scanlab-saved-{path}")


def _damage(path: Path) -> str | None:
    """What is wrong with a step's files, or None when each matches its checksum."""
    try:
        recorded = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "has no checksums: its save was cut off before it completed"
    except (OSError, ValueError) as error:
        return f"has unreadable checksums ({error})"
    files = _files(path)
    missing = sorted(set(recorded) - set(files))
    if missing:
        return f"is damaged: {missing[0]} is missing"
    extra = sorted(set(files) - set(recorded))
    if extra:
        return f"is damaged: {extra[0]} was not part of the save"
    for name, digest in recorded.items():
        if _sha256(files[name]) != digest:
            return f"is damaged: {name} does not match its SHA-256"
    return None
