"""Running on several devices with JAX's own sharding: meshes, batch placement, host devices.

On a CPU, XLA can present the host as N devices (`host_devices(N)`), each running its shard of a
sharded program on its own thread: the batch rows of a scan then run on N cores at once. This
must happen before JAX's backend starts (before the first computation), so it belongs to entry
points — the CLI and the benchmark runner call it — never to importing scanlab.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def host_devices(n: int) -> None:
    """Presents the CPU as `n` devices. Call before any JAX computation."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as error:
        raise RuntimeError(
            f"host_devices({n}) must run before JAX's first computation; the backend is "
            f"already up with {jax.device_count()} device(s)"
        ) from error


def batch_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `n_devices` devices (default: all), axis name "data"."""
    devices = jax.devices()
    n_devices = len(devices) if n_devices is None else n_devices
    if not 1 <= n_devices <= len(devices):
        raise ValueError(f"n_devices must be in [1, {len(devices)}], got {n_devices}")
    return Mesh(np.array(devices[:n_devices]), (DATA_AXIS,))


def shard_leading_axis(x, mesh: Mesh, name: str = "x") -> jax.Array:
    """Places `x` with its leading (batch) axis split over the mesh's first axis."""
    axis = mesh.axis_names[0]
    size = mesh.shape[axis]
    if np.ndim(x) < 1 or np.shape(x)[0] % size:
        raise ValueError(
            f"{name} must have a leading batch axis divisible by the mesh's {axis!r} size {size}, "
            f"got shape {np.shape(x)}"
        )
    spec = PartitionSpec(axis, *([None] * (np.ndim(x) - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))


def replicate(x, mesh: Mesh) -> jax.Array:
    """Places a full copy of `x` on every device of the mesh."""
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
