"""Running on several devices with JAX's own sharding: meshes, placement, host devices.

A mesh has two axes: "data" (the batch is split over it, and so is the model width D of every
parameter: fully-sharded data parallel) and "model" (key/value heads and the MLP width F are split
over it: tensor parallel). The leading layer axis of the stacked blocks is never split, so the
layer scan still slices one whole layer per step; XLA's SPMD partitioner inserts the gathers and
reductions each layer needs.

On a CPU, XLA can present the host as N devices (`host_devices(N)`), each running its shard of a
sharded program on its own thread: the batch rows of a scan then run on N cores at once. This
must happen before JAX's backend starts (before the first computation), so it belongs to entry
points — the CLI and the benchmark runner call it — never to importing scanlab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader
import numpy as np

# JAX is imported on first use: the CLI parses --mesh (`parse_mesh`) before JAX starts.
if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh
else:
    jax = lazy_loader.load("jax")

from scanlab import distributed
from scanlab.checks import shown
from scanlab.errors import ArgumentError

DATA_AXIS, MODEL_AXIS = "data", "model"


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
        raise ArgumentError(f"n_devices must be in [1, {len(devices)}], got {n_devices}")
    return jax.sharding.Mesh(np.array(devices[:n_devices]), (DATA_AXIS,))


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=4,model=2" -> {"data": 4, "model": 2}; a missing axis has size 1."""
    sizes, seen = {DATA_AXIS: 1, MODEL_AXIS: 1}, set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ArgumentError(
                f"{shown('mesh')} must look like 'data=4,model=2' (axes data and model, sizes "
                f">= 1), got {spec!r}"
            )
        if name in seen:
            raise ArgumentError(
                f"{shown('mesh')} must name each axis once, got {name!r} twice in {spec!r}"
            )
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str = "data=1") -> Mesh:
    """A ("data", "model") mesh from a spec like "data=4,model=2", on the first devices.

    Across processes (`scanlab.distributed`) the devices are every process's, and the mesh must
    hold some of each process's.
    """
    sizes = parse_mesh(spec)
    needed, available = sizes[DATA_AXIS] * sizes[MODEL_AXIS], jax.device_count()
    if needed > available:
        raise ArgumentError(
            f"{shown('mesh')} {spec!r} needs {needed} devices, got {available}; on a CPU, present "
            f"more with scanlab.sharding.host_devices({needed}) before any computation"
        )
    devices = np.array(jax.devices()[:needed]).reshape(sizes[DATA_AXIS], sizes[MODEL_AXIS])
    distributed.check_mesh_covers_processes(devices)
    return jax.sharding.Mesh(devices, (DATA_AXIS, MODEL_AXIS))


def axis_size(mesh: Mesh, axis: str) -> int:
    return mesh.shape.get(axis, 1)


def check_divisible(name: str, size: int, mesh: Mesh, axis: str) -> None:
    """Raises if `size` does not split evenly over the mesh axis."""
    parts = axis_size(mesh, axis)
    if size % parts:
        raise ArgumentError(
            f"{name}={size} must be divisible by the mesh's {axis!r} axis size {parts}"
        )


def named(specs, mesh: Mesh):
    """A tree of PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: jax.sharding.NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda node: isinstance(node, jax.sharding.PartitionSpec),
    )


def shard_batch(x, mesh: Mesh, name: str = "batch") -> jax.Array:
    """Places `x` with its leading (batch) axis split over "data" (whole along "model")."""
    parts = axis_size(mesh, DATA_AXIS)
    if np.ndim(x) < 1 or np.shape(x)[0] % parts:
        raise ArgumentError(
            f"{name} must have a leading batch axis divisible by the mesh's {DATA_AXIS!r} axis "
            f"size {parts}, got shape {np.shape(x)}"
        )
    spec = jax.sharding.PartitionSpec(DATA_AXIS, *([None] * (np.ndim(x) - 1)))
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def replicate(x, mesh: Mesh) -> jax.Array:
    """Places a full copy of `x` on every device of the mesh."""
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
