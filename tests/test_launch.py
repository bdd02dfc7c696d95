"""`scanlab launch`'s choice of the failure it reports, with real child processes (the whole
multi-process runs are in test_distributed.py, `make test-e2e`)."""

import signal
import subprocess
import sys

from scanlab import launch as launching
from scanlab.launch import launch

# Each child's behaviour by its process id: 1 kills itself, 0 waits for that death and then
# fails as a peer of a lost collective does (the order a launcher polling slowly may see at once).
PEER_DIES_THEN_ZERO_FAILS = """
import os, signal, sys, time
rank = int(os.environ["JAX_PROCESS_ID"])
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(0.5)
print("error: a collective lost its peer", flush=True)
sys.exit(2)
"""


def test_a_killed_process_is_reported_before_the_peer_error_it_caused(monkeypatch):
    monkeypatch.setattr(launching.time, "sleep", lambda s: None)  # see both ends in one poll
    reports = []
    original_poll = subprocess.Popen.poll

    def poll_after_both_end(child):
        child.wait()  # the launcher's first poll finds both processes already ended
        return original_poll(child)

    monkeypatch.setattr(subprocess.Popen, "poll", poll_after_both_end)
    status = launch(
        ["ignored"],
        processes=2,
        write=lambda line: None,
        report=reports.append,
        program=[sys.executable, "-c", PEER_DIES_THEN_ZERO_FAILS],
    )
    assert status == 128 + signal.SIGKILL
    assert reports == ["error: process 1 of 2 was killed by signal 9"]


def test_a_lone_failure_is_reported_with_its_status_and_last_error_line():
    reports = []
    status = launch(
        ["ignored"],
        processes=2,
        write=lambda line: None,
        report=reports.append,
        program=[sys.executable, "-c", "import sys; print('error: bad flag'); sys.exit(3)"],
    )
    assert status == 3
    assert reports in (
        ["error: process 0 of 2 exited with status 3: bad flag"],
        ["error: process 1 of 2 exited with status 3: bad flag"],
    )
