import io
import os
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from rich.console import Console
from tests.tiny import TINY_TRAIN

from scanlab import render
from scanlab.train import TrainConfig, checkpoints, load, train

pytestmark = pytest.mark.slow  # whole training runs with orbax checkpoints: not in `make test-fast`

# A smaller model than the default: these tests are about the run, not the learning.
CONFIG = TrainConfig(steps=60, chunk_steps=10, warmup_steps=10, **TINY_TRAIN)


class Interrupted(Exception):
    pass


def interrupt_at(step):
    def on_chunk(report):
        if report.step == step:
            raise Interrupted

    return on_chunk


def test_resumed_run_ends_with_exactly_the_same_parameters(tmp_path):
    full = train(CONFIG, checkpoint_dir=tmp_path / "full", checkpoint_every=2)
    with pytest.raises(Interrupted):
        train(
            CONFIG, checkpoint_dir=tmp_path / "cut", checkpoint_every=2, on_chunk=interrupt_at(50)
        )
    assert int(load(tmp_path / "cut").state.step) == 40  # the last checkpoint before the cut
    resumed = train(CONFIG, checkpoint_dir=tmp_path / "cut", checkpoint_every=2, resume=True)
    chex.assert_trees_all_equal(resumed.state, full.state)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    assert resumed.losses.shape == (60,)


def test_half_written_checkpoint_is_ignored_on_resume(tmp_path):
    with pytest.raises(Interrupted):
        train(CONFIG, checkpoint_dir=tmp_path, checkpoint_every=2, on_chunk=interrupt_at(40))
    # A save killed mid-way: orbax's temporary directory for step 60, never renamed into place.
    killed = tmp_path / "60.orbax-checkpoint-tmp-1234567"
    (killed / "state").mkdir(parents=True)
    (killed / "state" / "partial").write_bytes(b"\0" * 10)
    assert int(load(tmp_path).state.step) == 40
    resumed = train(CONFIG, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    assert int(resumed.state.step) == 60
    assert not killed.exists()  # removed, not left behind for good


def test_resume_with_another_config_is_refused_and_keeps_the_checkpoints(tmp_path):
    train(CONFIG, checkpoint_dir=tmp_path, checkpoint_every=2)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(
        ValueError, match=r"was written by a different config: batch_size=64 there, 16 here"
    ):
        train(CONFIG.replace(batch_size=16), checkpoint_dir=tmp_path, resume=True)
    assert sorted(os.listdir(tmp_path)) == before
    assert int(load(tmp_path).state.step) == 60


def test_a_new_run_does_not_overwrite_an_old_one(tmp_path):
    train(CONFIG, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"already holds a run .*latest step 60.*pass resume=True"):
        train(CONFIG, checkpoint_dir=tmp_path)


def test_a_checkpoint_too_big_for_its_disk_is_refused_before_the_first_chunk(tmp_path, monkeypatch):
    import shutil

    chunks = []
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=4096))
    with pytest.raises(
        checkpoints.CheckpointWriteError,
        match=rf"checkpoint_dir {tmp_path} has 0.0 MiB free, and a checkpoint of this run needs",
    ):
        train(CONFIG, checkpoint_dir=tmp_path, on_chunk=chunks.append)
    assert chunks == []


def test_resume_needs_something_to_resume(tmp_path):
    with pytest.raises(ValueError, match="holds no complete checkpoint to resume"):
        train(CONFIG, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume needs a checkpoint_dir, got None"):
        train(CONFIG, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1, got 0"):
        train(CONFIG, checkpoint_every=0)


def test_progress_reports_every_chunk():
    reports = []
    train(CONFIG.replace(steps=25), on_chunk=reports.append)
    assert [r.step for r in reports] == [10, 20, 25]
    assert all(r.steps_per_s > 0 and np.isfinite(r.mean_loss) for r in reports)


def test_a_damaged_checkpoint_is_named_before_orbax_reads_it(tmp_path):
    """In its own process, to see its whole output: the checksums name the damage, so orbax's
    readers never meet it (they used to leave pages of asyncio tracebacks behind)."""
    script = f"""
from pathlib import Path
from scanlab.train import TrainConfig, load, train
from scanlab.train import checkpoints

run = Path({str(tmp_path)!r})
train(TrainConfig(steps=20, chunk_steps=10, warmup_steps=5), checkpoint_dir=run)
data = sorted((run / "20" / "state").glob("ocdbt.process_0/d/*"), key=lambda f: f.stat().st_size)
data[-1].write_bytes(data[-1].read_bytes()[: data[-1].stat().st_size // 2])
for damage in ("truncated", "truncated before its checksums were taken"):
    if damage != "truncated":
        checkpoints._write_manifest(run / "20")  # the sums now agree with the damaged file
    try:
        load(run)
    except checkpoints.CheckpointReadError as error:
        print(damage, "->", error, flush=True)
    if damage == "truncated":
        import sys
        print("end of the first case", file=sys.stderr, flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"truncated -> checkpoint {tmp_path}/20 is damaged: state/"), lines
    assert lines[0].endswith("does not match its SHA-256; no older step verifies"), lines
    first_case = result.stderr.split("end of the first case")[0]
    assert "Traceback" not in first_case, first_case
    # Damage the checksums cannot see (the file was bad when they were taken): orbax's error,
    # named and cut to its first sentence.
    assert lines[1].startswith(
        f"truncated before its checksums were taken -> checkpoint {tmp_path}/20 cannot be read "
        "(Exception: Encountered error while reading"
    ), lines


def test_raising_steps_on_resume_continues_under_the_longer_schedule(tmp_path):
    """60 steps planned, then extended to 100: equal to running the first 60 steps under the
    60-step schedule and the next 40 under the 100-step one, in one process."""
    from scanlab.train import init_state, train_chunk
    from scanlab.train.step import learning_rate, run_settings

    train(CONFIG, checkpoint_dir=tmp_path)
    longer = CONFIG.replace(steps=100)
    extended = train(longer, checkpoint_dir=tmp_path, resume=True)
    assert int(extended.state.step) == 100 and len(extended.losses) == 100

    state, first = train_chunk(init_state(CONFIG), config=CONFIG, steps=60)
    state, rest = train_chunk(state, config=longer, steps=40)
    chex.assert_trees_all_close(extended.state.params, state.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(extended.losses, np.concatenate([first, rest]), rtol=1e-6)
    # What the extension does to the learning rate: it steps up where the longer plan resumes.
    assert learning_rate(run_settings(longer))(60) > learning_rate(run_settings(CONFIG))(59)
    assert load(tmp_path).config == longer  # the saved run now plans 100 steps
    with pytest.raises(
        ValueError, match=r"steps may only grow on resume: .* plans 100 steps, got 80"
    ):
        train(CONFIG.replace(steps=80), checkpoint_dir=tmp_path, resume=True)
    # Resumed when finished: nothing runs, and the progress says so.
    shown = io.StringIO()
    with render.training_progress(Console(file=shown, width=200), "train", 100) as on_chunk:
        again = train(longer, checkpoint_dir=tmp_path, resume=True, on_chunk=on_chunk)
    chex.assert_trees_all_equal(again.state, extended.state)
    assert "train: nothing to train, the run is finished (100 of 100 steps)" in shown.getvalue()


def test_a_log_shows_the_run_alive_until_the_first_chunk(monkeypatch):
    from scanlab.train import ChunkReport

    monkeypatch.setattr(render, "WAITING_LINE_S", 0.05)
    shown = io.StringIO()
    with render.training_progress(Console(file=shown, width=200), "train", 10) as on_chunk:
        time.sleep(0.3)  # loading, compiling
        on_chunk(ChunkReport(5, 10, 1.0, 2.0, False))
        time.sleep(0.3)  # the lines stop with the first chunk's
    lines = shown.getvalue().splitlines()
    assert lines[0] == "train: preparing the first chunk (loading, compiling): 0 s"
    assert len(lines) >= 3 and lines[-1].startswith("train: step 5/10, loss 1.0000")


def test_ctrl_c_saves_the_newest_whole_state_and_the_run_resumes_exactly(tmp_path):
    def ctrl_c_at(step):
        def on_chunk(report):
            if report.step == step:
                raise KeyboardInterrupt

        return on_chunk

    full = train(CONFIG, checkpoint_dir=tmp_path / "full", checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, checkpoint_dir=tmp_path / "cut", checkpoint_every=100, on_chunk=ctrl_c_at(30))
    # No regular save was due (every 100 chunks): the interrupt saved step 30 itself.
    assert int(load(tmp_path / "cut").state.step) == 30
    resumed = train(CONFIG, checkpoint_dir=tmp_path / "cut", checkpoint_every=100, resume=True)
    chex.assert_trees_all_equal(resumed.state, full.state)
    np.testing.assert_array_equal(resumed.losses, full.losses)


def test_an_interrupt_during_a_chunk_s_dispatch_waits_for_its_output():
    """The chunk donates its input: Ctrl-C is held until the output is assigned, then raised."""
    import signal

    from scanlab.train.loop import _Interrupts

    assigned = []

    def dispatch():
        with _Interrupts(lambda: "stopping after this chunk").held():
            signal.raise_signal(signal.SIGINT)
            assigned.append(True)  # what the held signal did not interrupt

    # Python's own Ctrl-C handler, whatever the test process inherited (a worker may start with
    # SIGINT ignored, and earlier tests in it may have set another).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            dispatch()
        assert assigned == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def _started_training(tmp_path, *flags) -> subprocess.Popen:
    """A real `scanlab train` run into `tmp_path`, returned once it holds the directory (before
    its first chunk compiles)."""
    run = subprocess.Popen(
        [sys.executable, "-m", "scanlab", "train", "--checkpoint-dir", str(tmp_path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / checkpoints.LOCK
    deadline = time.monotonic() + 60
    while f"process {run.pid} " not in (lock.read_text() if lock.exists() else ""):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    return run


def test_a_held_directory_is_refused_and_ctrl_c_twice_stops_the_chunk_in_flight(tmp_path):
    """A real first run (another process) holds its checkpoint directory from before it
    compiles; a second run into it is refused before any work, and the first is untouched.
    Then, its one chunk of many steps in flight: the first Ctrl-C is answered at once, the
    second ends the run without waiting for the chunk or saving it."""
    import signal

    first = _started_training(tmp_path, "--steps", "100000", "--chunk-steps", "100000")
    try:
        with pytest.raises(
            checkpoints.CheckpointInUseError,
            match=rf"checkpoint_dir {tmp_path} is in use by another run \(process {first.pid} on ",
        ):
            train(CONFIG, checkpoint_dir=tmp_path)
        assert first.poll() is None  # still training
        time.sleep(3)  # past its set-up (which Ctrl-C ends at once), into the chunk
        first.send_signal(signal.SIGINT)
        time.sleep(1)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=10)  # the chunk would take many minutes
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 130, err
    assert "stopping after this chunk; Ctrl-C again to stop now without saving it" in err, err
    assert err.rstrip().endswith("error: interrupted"), err
    assert not [path for path in tmp_path.iterdir() if path.name.isdigit()]  # no step saved
    # The lock ended with its process: the directory is free.
    assert train(CONFIG.replace(steps=20), checkpoint_dir=tmp_path).losses.shape == (20,)
