"""Several processes as one JAX program (jax.distributed, gloo over localhost), started by
`scanlab launch`: training equal across 1, 2 and 4 processes, checkpoints resumed by another
process count, generation, a dead peer, the launcher's statuses and every bad setting.

Each process is a fresh interpreter; every run is bounded by a timeout, and the dead-peer test
ends its processes by their ids and checks that none is left.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from tests.tiny import fast_compile_env

from scanlab import distributed, train

pytestmark = pytest.mark.e2e  # whole multi-process runs: `make test-e2e`

TRAIN = "train --steps 20 --chunk-steps 10 --warmup-steps 5 --batch-size 8 --mesh data=4".split()


def scanlab(*args: str, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scanlab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
    )


def clean_env(fast_compile: bool = True) -> dict[str, str]:
    """This environment without any run's settings (a test process is never one), compiling
    fast (the runs are of a tiny model) unless told not to: processes whose numbers are compared
    bit for bit must compile alike."""
    names = (distributed.COORDINATOR_ENV, distributed.PROCESSES_ENV, distributed.PROCESS_ID_ENV)
    env = {k: v for k, v in os.environ.items() if k not in names}
    return fast_compile_env(env) if fast_compile else env


def launched(processes: int, devices: int, *command: str) -> subprocess.CompletedProcess:
    return scanlab(
        "launch",
        "--processes",
        str(processes),
        "--devices-per-process",
        str(devices),
        "--",
        *command,
    )


def started_on_two_processes(*command: str) -> subprocess.Popen:
    """`scanlab launch --processes 2 -- COMMAND` started, not awaited; its output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "scanlab", "launch", "--processes", "2", "--", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training run as 1 × 4, 2 × 2 and 4 × 1 processes × devices, and as one plain
    process of 4 host devices (no distributed runtime); each leaves its checkpoint directory (the
    launched ones saved after every chunk) and the launched ones their standard output beside it
    (NAME.stdout)."""
    root = tmp_path_factory.mktemp("runs")
    for name, processes, devices in (("1", 1, 4), ("2", 2, 2), ("4", 4, 1)):
        every_chunk = ["--checkpoint-every", "1", "--checkpoint-dir", str(root / name)]
        result = launched(processes, devices, *TRAIN, *every_chunk)
        assert result.returncode == 0, result.stderr[-2000:]
        (root / f"{name}.stdout").write_text(result.stdout)
    plain = scanlab(*TRAIN, "--checkpoint-dir", str(root / "plain"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    return root


def test_training_is_bitwise_equal_on_1_2_and_4_processes(runs):
    one, two, four = (train.load(runs / name) for name in ("1", "2", "4"))
    for other in (two, four):
        chex.assert_trees_all_equal(other.state, one.state)
        np.testing.assert_array_equal(other.losses, one.losses)
    # One plain process sums its devices' gradients in another order than gloo: float32 ulps.
    plain = train.load(runs / "plain")
    chex.assert_trees_all_close(plain.state, one.state, atol=1e-6, rtol=0)


def test_only_the_first_process_speaks_and_writes(runs):
    for name in ("2", "4"):
        output = (runs / f"{name}.stdout").read_text()
        lines = output.splitlines()
        assert lines and all(line.startswith("[0] ") for line in lines), lines
        assert "[0] train reverse: step 20/20" in output and (runs / name / "loss.png").is_file()
    everyone = scanlab(
        "launch",
        "--processes",
        "2",
        "--all-output",
        "--",
        "decoder",
        "generate",
        "--mesh",
        "data=2",
    )
    assert everyone.returncode == 0 and "[1] " not in everyone.stdout  # rank 1 stays quiet


def test_a_checkpoint_resumes_on_another_process_count(runs, tmp_path):
    """Saved by 2 processes after every chunk, resumed from step 10 by 4 processes and by one
    (launched): both end bitwise equal to the uninterrupted run."""
    saved = Path(shutil.copytree(runs / "2", tmp_path / "saved"))
    uninterrupted = train.load(runs / "2")
    for processes, devices in ((4, 1), (1, 4)):
        resume = ["train", "--checkpoint-dir", str(saved), "--resume", "--resume-step", "10"]
        result = launched(processes, devices, *resume, "--mesh", "data=4")
        assert result.returncode == 0, result.stderr[-2000:]
        resumed = train.load(saved)
        chex.assert_trees_all_equal(resumed.state, uninterrupted.state)
        np.testing.assert_array_equal(resumed.losses, uninterrupted.losses)


def test_greedy_generation_is_the_same_on_two_processes():
    command = ["decoder", "generate", "--tokens", "1,2,3,4", "--max-new-tokens", "8"]
    alone = scanlab(*command, "--mesh", "data=2")
    together = launched(2, 1, *command, "--mesh", "data=2")
    assert alone.returncode == 0 and together.returncode == 0, together.stderr[-2000:]
    generated = [line for line in alone.stdout.splitlines() if line.startswith("generated")]
    assert generated and f"[0] {generated[0]}" in together.stdout.splitlines()


def children_of_run(marker: str) -> dict[int, int]:
    """{process id in the run: pid} of the running processes whose command line has `marker`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker not in cmdline or "launch" in cmdline:
            continue
        for entry in environ:
            if entry.startswith(f"{distributed.PROCESS_ID_ENV}=".encode()):
                found[int(entry.split(b"=", 1)[1])] = int(proc.name)
    return found


def test_a_dead_peer_ends_the_run_within_seconds_naming_it(tmp_path):
    marker = str(tmp_path / "run")
    command = ["train", "--steps", "100000", "--mesh", "data=2", "--checkpoint-dir", marker]
    with started_on_two_processes(*command) as launcher:
        try:
            deadline = time.monotonic() + 120
            while len(children := children_of_run(marker)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(8)  # into training: both processes inside their collectives
            os.kill(children[1], signal.SIGKILL)
            killed_at = time.monotonic()
            _, err = launcher.communicate(timeout=60)
            took = time.monotonic() - killed_at
        finally:
            for pid in children_of_run(marker).values():
                os.kill(pid, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGKILL, err
    assert err.strip().splitlines()[-1] == "error: process 1 of 2 was killed by signal 9", err
    assert took < 5, took  # not JAX's heartbeat timeout, let alone 100 s
    assert not children_of_run(marker)  # every process ended


def test_the_launcher_exits_with_the_first_failure_s_status():
    result = launched(2, 1, "train", "--steps", "0")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: process [01] of 2 exited with status 2: --steps must be >= 1, got 0", last
    ), last
    nothing = scanlab("launch", "--processes", "2")
    assert nothing.returncode == 2 and nothing.stderr.startswith(
        "error: launch needs a scanlab command after --"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "needs JAX_NUM_PROCESSES set"),
        (
            {"JAX_COORDINATOR_ADDRESS": "nowhere", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            "--coordinator must be host:port, got 'nowhere'",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "2",
            },
            "--process-id must be in [0, 2), got 2",
        ),
    ],
)
def test_bad_settings_are_one_line_before_any_work(settings, message):
    result = scanlab("train", env=clean_env() | settings, timeout=60)
    assert (
        result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    )


def test_a_port_in_use_and_a_mesh_leaving_a_process_out_are_refused():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = scanlab(
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "1",
            "--process-id",
            "0",
            "train",
            timeout=60,
        )
    assert result.returncode == 2
    assert f"error: --coordinator 127.0.0.1:{port}: the port cannot be bound" in result.stderr
    assert "another program listens on it; pick a free port" in result.stderr
    result = launched(2, 1, *TRAIN[:-2], "--mesh", "data=1")
    assert result.returncode == 2
    assert "--mesh of 1 device(s) leaves process(es) [1] of 2 without devices" in result.stderr


def test_a_single_process_cluster_call_runs_the_library_unchanged(tmp_path):
    """The README's cluster call, with one process: the same train() and the same numbers."""
    port = distributed.free_port()
    code = f"""
from scanlab import distributed, sharding, train
sharding.host_devices(2)
distributed.initialize(distributed.Settings("127.0.0.1:{port}", num_processes=1, process_id=0))
config = train.TrainConfig(steps=20, chunk_steps=10, warmup_steps=5, batch_size=8)
result = train.train(config, mesh=sharding.make_mesh("data=2"))
print(result.losses[-1])
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert math.isfinite(float(result.stdout.split()[-1]))


RECURRENCE = """
import json, os, sys
import numpy as np
from scanlab import distributed, sharding
from scanlab.recurrence import lax_scan_in_module
settings = distributed.from_env()
if settings is not None:
    sharding.host_devices(int(os.environ[distributed.HOST_DEVICES_ENV]))
    distributed.initialize(settings)
x = np.linspace(-1, 1, 4 * 8, dtype=np.float32).reshape(4, 8)
mesh = sharding.batch_mesh() if settings is not None else None
h = distributed.fetched(lax_scan_in_module(0, x, 8, 50, mesh=mesh))  # rows split over processes
if distributed.is_primary():
    print(json.dumps(h.tolist()))
"""


def test_the_recurrence_splits_its_batch_over_processes():
    from scanlab import launch

    lines = []
    status = launch.launch([], 2, write=lines.append, program=(sys.executable, "-c", RECURRENCE))
    alone = subprocess.run(  # compiled as the launched processes are: with this environment's
        [sys.executable, "-c", RECURRENCE],
        capture_output=True,
        text=True,
        env=clean_env(fast_compile=False),
    )
    assert status == 0 and alone.returncode == 0, (lines, alone.stderr[-2000:])
    together = next(line for line in lines if line.startswith("[0] ["))[4:]
    np.testing.assert_array_equal(
        np.array(json.loads(together)), np.array(json.loads(alone.stdout))
    )


def test_an_interrupt_saves_every_process_s_newest_state_and_the_nan_stop_stops_all(tmp_path):
    """SIGTERM to the launcher (what a scheduler sends; Ctrl-C takes the same path, but a test
    runner's worker may start its children with SIGINT ignored) reaches every process as Ctrl-C;
    they agree on the chunk to stop after, save it together (orbax's save is collective) and
    exit."""
    run = tmp_path / "run"
    command = f"train --steps 100000 --chunk-steps 20 --mesh data=2 --checkpoint-dir {run}"
    with started_on_two_processes(*command.split()) as launcher:
        try:
            for line in launcher.stdout:
                if line.startswith("[0] train reverse: step 40/"):
                    break  # two chunks in: training, not compiling
            launcher.send_signal(signal.SIGTERM)
            _, err = launcher.communicate(timeout=120)
        finally:
            launcher.kill()
    assert launcher.returncode == 143 and err.strip().splitlines()[-1] == "error: terminated", err
    saved = train.load(run)  # verified: complete, with its checksums
    assert int(saved.state.step) >= 40 and len(saved.losses) == int(saved.state.step)
    diverging = launched(2, 1, *TRAIN[:-2], "--mesh", "data=2", "--learning-rate", "1e30")
    assert diverging.returncode == 2
    assert re.search(
        r"error: process [01] of 2 exited with status 2: the loss became", diverging.stderr
    )
