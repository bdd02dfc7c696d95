"""Several processes as one JAX program, on JAX's own distributed runtime.

Each process calls `initialize` before any JAX computation; from then on `jax.devices()` lists
every process's devices and a mesh over them is one global mesh: the same `train`, `forward` and
`generate` calls run across processes, XLA's collectives carried by gloo on CPUs (jaxlib's
default) or by the accelerators' own links. On one machine `scanlab launch` starts the processes
(`scanlab.launch`); on a cluster the scheduler does, and each process reads the standard
settings from its environment (`from_env`) or its command line.

Only the first process prints and writes plots; orbax coordinates checkpoint writes itself, and
the checksums scanlab adds are written by the first process between two barriers.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import lazy_loader
import numpy as np

from scanlab.checks import shown
from scanlab.errors import ArgumentError, JoinTimeoutError

if TYPE_CHECKING:
    import jax
else:
    jax = lazy_loader.load("jax")

# The standard settings' environment variables (JAX reads the first itself).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# The CPU devices each process presents (`sharding.host_devices`), set by `scanlab launch`.
HOST_DEVICES_ENV = "SCANLAB_HOST_DEVICES"
# Host devices are threads of one process, each with its own buffers: beyond this many, a request
# is a typo, not a machine.
MAX_HOST_DEVICES = 1024

# A process that stops sending heartbeats for this long is dead to the others (JAX's default,
# 100 s, leaves a run hanging on a lost peer for minutes).
HEARTBEAT_TIMEOUT_S = 10
# How long a process waits for every other one to join before giving up (`initialize`).
JOIN_TIMEOUT_S = 60
# JAX aborts the process (a C++ check, exit 134) at its own initialization timeout: it is set
# past ours, so ours ends the wait first, with one line.
JAX_TIMEOUT_MARGIN_S = 30
# The slices the wait for the join is cut into: how soon Ctrl-C and SIGTERM act during it.
JOIN_POLL_S = 0.1


class Settings(NamedTuple):
    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int


_joined: list[Settings] = []  # the run this process joined or is joining, if any


def joined() -> Settings | None:
    """The settings of the run this process joined or is joining (`initialize`), or None."""
    return _joined[0] if _joined else None


def from_env(environ: Mapping[str, str] = os.environ) -> Settings | None:
    """The settings in the environment, or None when it names no coordinator (one process)."""
    coordinator = environ.get(COORDINATOR_ENV)
    if not coordinator:
        return None
    values = {}
    for name in (PROCESSES_ENV, PROCESS_ID_ENV):
        text = environ.get(name, "")
        if not text.isdigit():
            raise ArgumentError(
                f"{COORDINATOR_ENV}={coordinator} needs {name} set to a non-negative integer, "
                f"got {text!r}"
            )
        values[name] = int(text)
    return checked(Settings(coordinator, values[PROCESSES_ENV], values[PROCESS_ID_ENV]))


def check_host_devices(name: str, n: int) -> None:
    """`n` CPU devices for one process, asked for by `name` (a flag or variable)."""
    if not 1 <= n <= MAX_HOST_DEVICES:
        raise ArgumentError(f"{name} must ask for 1 to {MAX_HOST_DEVICES} devices, got {n}")


def checked(settings: Settings) -> Settings:
    """The settings, refused with a one-line error when they cannot describe a run."""
    host, _, port = settings.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ArgumentError(
            f"{shown('coordinator')} must be host:port, got {settings.coordinator!r}"
        )
    if settings.num_processes < 1:
        raise ArgumentError(f"{shown('num_processes')} must be >= 1, got {settings.num_processes}")
    if not 0 <= settings.process_id < settings.num_processes:
        raise ArgumentError(
            f"{shown('process_id')} must be in [0, {settings.num_processes}), got "
            f"{settings.process_id}"
        )
    return settings


def initialize(
    settings: Settings,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    join_timeout_s: float = JOIN_TIMEOUT_S,
) -> None:
    """Joins the run: `jax.distributed.initialize`, before any JAX computation.

    Process 0 binds the coordinator's port: a port already in use is refused before JAX starts.
    JAX waits for every process in a call that no signal interrupts, so it runs on a helper
    thread while this one waits: Ctrl-C and SIGTERM work meanwhile, and a run whose processes do
    not all arrive within `join_timeout_s` raises `JoinTimeoutError`. Either way the process
    must then end with `os._exit` (JAX's exit handler would wait for the peers again).
    """
    settings = checked(settings)
    if not join_timeout_s > 0:
        raise ArgumentError(f"{shown('join_timeout_s')} must be > 0, got {join_timeout_s}")
    if settings.process_id == 0:
        check_port_free(settings.coordinator)
    failures: list[BaseException] = []

    def join() -> None:
        try:
            jax.distributed.initialize(
                settings.coordinator,
                settings.num_processes,
                settings.process_id,
                heartbeat_timeout_seconds=heartbeat_timeout_s,
                initialization_timeout=int(join_timeout_s) + JAX_TIMEOUT_MARGIN_S,
            )
        except BaseException as error:  # re-raised on the waiting thread
            failures.append(error)

    joining = threading.Thread(target=join, name="scanlab-join", daemon=True)
    _joined.append(settings)
    joining.start()
    # Waited in short slices: a signal the kernel hands to one of JAX's threads rather than
    # this one does not cut a long wait short, and Python runs its handler only here, between
    # slices.
    deadline = time.monotonic() + join_timeout_s
    while joining.is_alive() and time.monotonic() < deadline:
        joining.join(JOIN_POLL_S)
    if joining.is_alive():
        raise JoinTimeoutError(
            f"process {settings.process_id} of {settings.num_processes} waited "
            f"{join_timeout_s:g} s at the coordinator {settings.coordinator} and not every "
            f"process of the run arrived: start all {settings.num_processes} with the same "
            f"coordinator, or raise {shown('join_timeout_s')}"
        )
    if failures:
        raise failures[0]


def check_port_free(coordinator: str) -> None:
    """Refuses, in one line, a coordinator address process 0 cannot serve: a host that does not
    resolve, one that is not this machine's, or a port another program listens on."""
    host, _, port = coordinator.rpartition(":")
    try:
        socket.getaddrinfo(host, int(port))
    except socket.gaierror as error:
        raise ArgumentError(
            f"{shown('coordinator')} {coordinator}: the host cannot be resolved ({error.strerror})"
        ) from None
    with socket.socket() as probe:
        # As the coordination service binds: a port left in TIME_WAIT by an ended run is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                advice = "another program listens on it; pick a free port"
            else:
                advice = "process 0 runs the coordinator: give an address of its machine"
            raise ArgumentError(
                f"{shown('coordinator')} {coordinator}: the port cannot be bound "
                f"({error.strerror}): {advice}"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def is_primary() -> bool:
    """Whether this is the process that prints and writes (process 0, or the only one)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this name (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is True on any process (a collective: every process must ask)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array(flag, np.int32))
    return bool(np.asarray(flags).any())


def fetched(array) -> np.ndarray:
    """A global array's whole value on this host, gathered from the processes holding its
    shards where it is not all here."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def check_mesh_covers_processes(devices: np.ndarray) -> None:
    """Every process must hold part of the mesh: a process without devices in it could not read
    the results (nor would its devices work)."""
    if jax.process_count() == 1:
        return
    covered = {device.process_index for device in devices.flat}
    missing = sorted(set(range(jax.process_count())) - covered)
    if missing:
        raise ArgumentError(
            f"{shown('mesh')} of {devices.size} device(s) leaves process(es) {missing} of "
            f"{jax.process_count()} without devices: use a multiple of the "
            f"{jax.local_device_count()} device(s) each process has"
        )
