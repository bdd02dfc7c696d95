"""Checkpoints that prove themselves: damage is named before anything is read, a failed save is
never reported saved and keeps the earlier steps, and nothing half-written stays behind."""

import contextlib
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tests.tiny import TINY_TRAIN

from scanlab.errors import PathError
from scanlab.train import CheckpointReadError, TrainConfig, checkpoints, load, train
from scanlab.train.checkpoints import ABANDONED, MANIFEST

pytestmark = (
    pytest.mark.e2e
)  # damaged, failed and full-disk checkpoints of whole runs: `make test-e2e`

CONFIG = TrainConfig(steps=30, chunk_steps=10, warmup_steps=5, **TINY_TRAIN)


def largest_data_file(step_dir):
    return max((step_dir / "state").rglob("d/*"), key=lambda file: file.stat().st_size)


def flip_one_bit(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_flipped_bit_is_named_and_the_run_resumes_from_the_newest_step_that_verifies(tmp_path):
    full = train(CONFIG, checkpoint_dir=tmp_path / "full", checkpoint_every=1)
    run = tmp_path / "cut"
    train(CONFIG, checkpoint_dir=run, checkpoint_every=1)
    damaged = largest_data_file(run / "30")
    flip_one_bit(damaged)
    name = damaged.relative_to(run / "30")
    message = (
        f"checkpoint {run}/30 is damaged: {name} does not match its SHA-256; step 20 verifies: "
    )
    with pytest.raises(CheckpointReadError, match=f"^{message}pass step 20"):
        load(run)
    with pytest.raises(CheckpointReadError, match=f"^{message}pass resume_step 20"):
        train(CONFIG, checkpoint_dir=run, resume=True)
    assert int(load(run, step=20).state.step) == 20
    resumed = train(CONFIG, checkpoint_dir=run, resume=True, resume_step=20, checkpoint_every=1)
    chex.assert_trees_all_equal(resumed.state, full.state)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    # The damaged step is moved aside, not deleted, and the run's own step 30 took its place.
    assert (run / ABANDONED / "30" / name).is_file()
    assert int(load(run).state.step) == 30


def test_the_cli_names_the_damage_and_the_flag_that_reads_the_step_that_verifies(tmp_path, cli):
    train(CONFIG.replace(steps=20), checkpoint_dir=tmp_path, checkpoint_every=1)
    flip_one_bit(largest_data_file(tmp_path / "20"))
    for command in (["evaluate"], ["train", "--resume"]):
        status, err, _ = cli([*command, "--checkpoint-dir", str(tmp_path)])
        flag = "--step" if command == ["evaluate"] else "--resume-step"
        assert status == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: checkpoint {tmp_path}/20 is damaged: state/"), err
        assert err.strip().endswith(f"step 10 verifies: pass {flag} 10 to read it"), err
    status, err, out = cli(["evaluate", "--checkpoint-dir", str(tmp_path), "--step", "10"])
    assert status == 0 and "accuracy after 10 steps" in out, err


def test_a_step_without_checksums_or_with_a_missing_file_is_refused(tmp_path):
    train(CONFIG.replace(steps=20), checkpoint_dir=tmp_path, checkpoint_every=1)
    (tmp_path / "20" / MANIFEST).unlink()  # a save cut off between orbax's rename and the sums
    with pytest.raises(
        CheckpointReadError, match=r"20 has no checksums: its save was cut off.*step 10 verifies"
    ):
        load(tmp_path)
    (tmp_path / "10" / "history" / "metadata").unlink()
    with pytest.raises(CheckpointReadError, match="10 is damaged: history/metadata is missing"):
        load(tmp_path, step=10)
    with pytest.raises(CheckpointReadError, match=r"step must be a saved step of .*\[10, 20\]"):
        load(tmp_path, step=15)


def test_a_saved_state_holding_nan_is_refused_where_it_is_read(tmp_path):
    from scanlab.train import init_state

    state = init_state(CONFIG)
    poisoned = state._replace(
        params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params)
    )
    with checkpoints.open_manager(tmp_path) as manager:
        checkpoints.save(
            manager,
            0,
            state=ocp.args.StandardSave(poisoned),
            history=ocp.args.JsonSave([]),
            config=ocp.args.JsonSave(CONFIG.to_dict()),
        )
    with pytest.raises(CheckpointReadError, match=r"0 holds NaN or Inf in state\.params"):
        load(tmp_path)


def test_a_read_only_directory_is_refused_before_training_on_resume_too(tmp_path):
    train(CONFIG.replace(steps=10), checkpoint_dir=tmp_path / "run")
    with read_only(tmp_path / "run"):
        with pytest.raises(PathError, match="checkpoint_dir must be a writable directory"):
            train(CONFIG, checkpoint_dir=tmp_path / "run", resume=True)


# A filesystem that holds one checkpoint of this run but not a second (a step is about 1 MiB).
SMALL_FILESYSTEM = "2500k"
TRAIN_ARGS = ["--steps", "400", "--chunk-steps", "50", "--checkpoint-every", "1"]


def test_a_full_filesystem_stops_the_run_at_once_keeping_the_earlier_step(tmp_path):
    with small_filesystem(tmp_path / "fs", SMALL_FILESYSTEM) as mount:
        run = mount / "run"
        result = subprocess.run(
            [sys.executable, "-m", "scanlab", "train", *TRAIN_ARGS, "--checkpoint-dir", str(run)],
            capture_output=True,
            text=True,
            timeout=300,  # the process exits: it used to hang after a failed save
        )
        assert result.returncode == 2, result.stderr[-3000:]
        progress = result.stdout.strip().splitlines()
        assert progress == ["train reverse: step 50/400, loss " + progress[0].split("loss ")[1]]
        assert progress[0].endswith("checkpoint saved")  # step 100's line never came
        errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: checkpoint {run}/100 could not be saved (it needs about "
        ), result.stderr
        assert errors[0].endswith("MiB are free); step 50 is kept")
        assert sorted(os.listdir(run)) == ["50", checkpoints.LOCK]  # nothing half-written
        assert int(load(run).state.step) == 50


def test_a_save_failing_inside_orbax_names_the_cause_and_leaves_nothing_half_written(tmp_path):
    """Past the free-space check (space taken while the save runs): the system's own reason."""
    script = f"""
from scanlab.train import TrainConfig, train, checkpoints
from scanlab.train.checkpoints import CheckpointWriteError
checkpoints._check_space = checkpoints.check_room = lambda *args: None
try:
    train(TrainConfig(steps=400, chunk_steps=50), checkpoint_dir={str(tmp_path)!r} + "/fs/run",
          checkpoint_every=1)
except CheckpointWriteError as error:
    print("raised:", error)
"""
    with small_filesystem(tmp_path / "fs", "1600k") as mount:
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
        )
        raised = [line for line in result.stdout.splitlines() if line.startswith("raised:")]
        assert raised == [
            f"raised: checkpoint {mount}/run/100 could not be saved ([Errno 28] No space left on "
            "device); step 50 is kept"
        ], result.stdout + result.stderr[-3000:]
        assert sorted(os.listdir(mount / "run")) == ["50", checkpoints.LOCK]
        assert int(load(mount / "run").state.step) == 50


def test_the_manifest_lists_every_file_of_the_step(tmp_path):
    train(CONFIG.replace(steps=10), checkpoint_dir=tmp_path)
    recorded = json.loads((tmp_path / "10" / MANIFEST).read_text())
    on_disk = {
        str(file.relative_to(tmp_path / "10"))
        for file in (tmp_path / "10").rglob("*")
        if file.is_file() and file.name != MANIFEST
    }
    assert set(recorded) == on_disk and len(on_disk) > 5
    (tmp_path / "10" / "state" / "stray").write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match="state/stray was not part of the save"):
        load(tmp_path)


@contextlib.contextmanager
def small_filesystem(path, size: str):
    """A tmpfs of `size` mounted at `path` for the test (skipped where mounting is refused)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"a tmpfs cannot be mounted here (needs root): {mounted.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def read_only(path):
    """`path` made read-only: a read-only bind mount for root (whom permissions do not stop),
    else its mode bits."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bound.returncode:
        pytest.skip(f"a read-only bind mount cannot be made here: {bound.stderr.decode()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)
