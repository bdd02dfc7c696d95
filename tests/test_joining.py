"""Joining a multi-process run from the CLI when the run never forms: help and flag errors
answer without joining, a join that waits too long is one line, Ctrl-C and SIGTERM end the wait,
and bad run settings are refused before any waiting. Each case is a real `scanlab` process (the
whole multi-process runs are in test_distributed.py, `make test-e2e`)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from scanlab import distributed

pytestmark = pytest.mark.slow  # real processes waiting at a coordinator: not in `make test-fast`


def alone_in_a_run_of_two(port: int, process_id: int = 0, **extra: str) -> dict[str, str]:
    """This environment, as a process of a run of two whose other process never comes."""
    names = (distributed.COORDINATOR_ENV, distributed.PROCESSES_ENV, distributed.PROCESS_ID_ENV)
    env = {k: v for k, v in os.environ.items() if k not in names}
    return env | {
        distributed.COORDINATOR_ENV: f"127.0.0.1:{port}",
        distributed.PROCESSES_ENV: "2",
        distributed.PROCESS_ID_ENV: str(process_id),
        **extra,
    }


def scanlab(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # The timeout only bounds a hang: each case below answers in seconds.
    return subprocess.run(
        [sys.executable, "-m", "scanlab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["finetune", "--help"], 0, "scanlab finetune [OPTIONS]"),
        (["train", "--bogus"], 2, "error: No such option: --bogus"),
        (["decoder", "generate", "--max-new-tokens", "x"], 2, "error: Invalid value"),
    ],
)
def test_help_and_flag_errors_answer_without_joining(args, status, says):
    result = scanlab(*args, env=alone_in_a_run_of_two(distributed.free_port()))
    assert result.returncode == status, result.stderr
    assert says in result.stdout + result.stderr


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_run_that_never_forms_is_one_line_after_the_join_timeout(process_id):
    port = distributed.free_port()
    result = scanlab("--join-timeout", "2", "explain", env=alone_in_a_run_of_two(port, process_id))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: process {process_id} of 2 waited 2 s at the coordinator 127.0.0.1:{port} and "
        "not every process of the run arrived: start all 2 with the same coordinator, or raise "
        "--join-timeout\n"
    )


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGINT, 130, "error: interrupted"), (signal.SIGTERM, 143, "error: terminated")],
)
def test_ctrl_c_and_sigterm_end_the_wait_for_peers(signum, status, line):
    port = distributed.free_port()
    waiting = subprocess.Popen(
        [sys.executable, "-m", "scanlab", "explain"],  # the default join timeout: a minute
        stderr=subprocess.PIPE,
        text=True,
        env=alone_in_a_run_of_two(port),
    )
    try:
        deadline = time.monotonic() + 60
        while not listening(port) and time.monotonic() < deadline:  # process 0 serves the run
            assert waiting.poll() is None, waiting.stderr.read()
            time.sleep(0.1)
        waiting.send_signal(signum)
        _, err = waiting.communicate(timeout=20)
    finally:
        waiting.kill()
        waiting.communicate()  # reaped, its pipe closed, whatever happened above
    assert waiting.returncode == status
    assert err.strip().splitlines()[-1] == line


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (
            ["explain"],
            {distributed.HOST_DEVICES_ENV: "abc"},
            "error: SCANLAB_HOST_DEVICES must be a whole number of devices, got 'abc'",
        ),
        (["--join-timeout", "0", "explain"], {}, "error: --join-timeout must be > 0, got 0"),
        (
            ["finetune", "--data", "x.jsonl"],
            {},
            "error: finetune cannot join a multi-process run: fine-tuning runs on one process",
        ),
    ],
)
def test_bad_run_settings_are_one_line_before_any_wait(args, extra, message):
    result = scanlab(*args, env=alone_in_a_run_of_two(distributed.free_port(), **extra))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr


@pytest.mark.parametrize(
    ("coordinator", "says"),
    [
        ("nohost.invalid:1234", "the host cannot be resolved"),
        ("192.0.2.1:1234", "process 0 runs the coordinator: give an address of its machine"),
    ],
)
def test_a_coordinator_process_0_cannot_serve_is_named_with_its_cause(coordinator, says):
    result = scanlab(
        "--coordinator",
        coordinator,
        "--num-processes",
        "2",
        "--process-id",
        "0",
        "explain",
        env=alone_in_a_run_of_two(distributed.free_port()),
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --coordinator {coordinator}: ")
    assert says in result.stderr and "pick a free port" not in result.stderr
