"""`scanlab launch`: N local processes of one JAX program, the way a cluster scheduler starts them.

Each process is `python -m scanlab COMMAND...` with the standard settings in its environment
(`scanlab.distributed`: the coordinator on a free localhost port, the process count, its id, the
CPU devices it presents); the CLI joins the run before any JAX work. Their output is streamed
line by line with a `[rank]` prefix (process 0's only, unless all are asked for); the launcher
exits with the first failure's status, ending the other processes at once (by their process
ids), so a dead peer stops the run within a second rather than at JAX's heartbeat timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from scanlab import distributed
from scanlab.checks import host_memory_bytes
from scanlab.errors import ArgumentError, OutOfMemoryError

# What each process runs, before the command's words: the scanlab CLI.
SCANLAB = (sys.executable, "-m", "scanlab")

# How long the processes get to end on Ctrl-C (a training run saves its state, all together)
# before SIGKILL; after a peer's failure the others cannot finish a collective, and get less.
GRACE_S, AFTER_FAILURE_S = 30.0, 2.0

# Commands that do not run as one program across processes, and why: each process would run
# the whole command alone and write the same files.
NOT_DISTRIBUTED = {
    "finetune": "fine-tuning runs on one process (no mesh yet): every process would train alone "
    "and write the same plot and merged model",
    "launch": "a launched process cannot launch more",
    "chat": "every process would read your typing",
    "serve": "every process would listen on the same port",
}


def environments(processes: int, devices_per_process: int) -> list[dict[str, str]]:
    """Each process's environment: this one's, plus the run's settings."""
    coordinator = f"127.0.0.1:{distributed.free_port()}"
    return [
        os.environ
        | {
            distributed.COORDINATOR_ENV: coordinator,
            distributed.PROCESSES_ENV: str(processes),
            distributed.PROCESS_ID_ENV: str(rank),
            distributed.HOST_DEVICES_ENV: str(devices_per_process),
        }
        for rank in range(processes)
    ]


# What each process needs at the least: a Python with JAX's runtime started, and per CPU device it
# presents (each device's buffers and threads).
PROCESS_BYTES, DEVICE_BYTES = 2**28, 2**17


def check_size(processes: int, devices_per_process: int) -> None:
    """Refuses a run this machine cannot hold, before any process starts."""
    if processes < 1:
        raise ArgumentError(f"--processes must be >= 1, got {processes}")
    distributed.check_host_devices("--devices-per-process", devices_per_process)
    needed = processes * (PROCESS_BYTES + devices_per_process * DEVICE_BYTES)
    memory = host_memory_bytes()
    if memory is not None and needed > memory:
        raise OutOfMemoryError(
            f"--processes {processes}: as many JAX runtimes need at least "
            f"{needed / 2**30:.1f} GiB, more than the {memory / 2**30:.1f} GiB this machine has"
        )


def launch(
    command: Sequence[str],
    processes: int,
    devices_per_process: int = 1,
    all_output: bool = False,
    write: Callable[[str], None] = lambda line: print(line, flush=True),
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    program: Sequence[str] = SCANLAB,
) -> int:
    """Runs `scanlab COMMAND...` (`program` + `command`) as `processes` processes; returns the
    run's exit status.

    0 when every process ends with 0; else the status of the first process to fail (128 + the
    signal for one killed by a signal), after one line to `report` naming it and its last
    error line. Output lines go to `write`.
    """
    if command and command[0] in NOT_DISTRIBUTED:
        raise ArgumentError(
            f"launch cannot run `{command[0]}`: {NOT_DISTRIBUTED[command[0]]}; run it without "
            "launch"
        )
    check_size(processes, devices_per_process)
    children = [
        subprocess.Popen(
            [*program, *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C reaches them through the launcher, once
        )
        for env in environments(processes, devices_per_process)
    ]
    last_lines = [""] * processes
    readers = [
        threading.Thread(
            target=_stream,
            args=(child, rank, all_output or rank == 0, write, last_lines),
            daemon=True,
        )
        for rank, child in enumerate(children)
    ]
    for reader in readers:
        reader.start()
    try:
        failed = _first_failure(children)
    except KeyboardInterrupt:
        _end(children, signal.SIGINT, GRACE_S)
        raise
    finally:
        for reader in readers:
            reader.join(timeout=GRACE_S)
        for child in children:
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
    if failed is None:
        return 0
    rank, code = failed
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    detail = f": {last_lines[rank]}" if last_lines[rank] else ""
    report(f"error: process {rank} of {processes} {how}{detail}")
    return 128 - code if code < 0 else code


def _first_failure(children: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Waits for every process; at the first failure ends the others and returns (its rank, its
    return code: negative for a signal); None when all succeed.

    Failures seen in one poll are ordered signal first: a killed process is the cause, and its
    peers' errors (a collective that lost it) are what followed.
    """
    while True:
        codes = [child.poll() for child in children]
        failures = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        failed = min(failures, key=lambda failure: (failure[1] >= 0, failure[0]), default=None)
        if failed is not None:
            _end(children, signal.SIGTERM, AFTER_FAILURE_S)
            return failed
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)


def _end(children: list[subprocess.Popen], how: int, grace_s: float) -> None:
    """Sends `how` to every process still running, then SIGKILL to any left after `grace_s`."""
    for child in children:
        if child.poll() is None:
            child.send_signal(how)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _stream(child, rank: int, shown: bool, write, last_lines: list[str]) -> None:
    """Copies a process's output line by line (prefixed), remembering its last error line."""
    for line in child.stdout:
        line = line.rstrip("\n")
        if line.startswith("error: "):
            last_lines[rank] = line.removeprefix("error: ")
        if shown and not _is_gloo_chatter(line):
            write(f"[{rank}] {line}")


def _is_gloo_chatter(line: str) -> bool:
    """gloo announces each connection on stdout; it says nothing about the run."""
    return line.startswith("[Gloo] ")
