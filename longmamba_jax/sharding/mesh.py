"""Meshes, the axis names the library reads, and placing a batch on a mesh.

Axes (docs/sharding.md, "Meshes"): "data" and "fsdp" split the batch (fsdp also splits the
weights), "tensor" splits heads / channels and the vocabulary, "seq" splits the sequence in
context-parallel prefill. A mesh may hold any subset; an axis of size 1 is the same as none.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, TENSOR, SEQ = "data", "fsdp", "tensor", "seq"
AXES = (DATA, FSDP, SEQ, TENSOR)  # outermost to innermost (tensor on the closest devices)
BATCH_AXES = (DATA, FSDP)


def make_mesh(*, data: int = 1, fsdp: int = 1, seq: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
    """A mesh with the axes data × fsdp × seq × tensor (all of them, sizes 1 included), of
    type Auto (XLA's GSPMD partitions what the library does not place itself).

    Args:
      data, fsdp, seq, tensor: axis sizes; their product must not exceed the devices.
      devices: the devices to use (default `jax.devices()`, the first product of them).
    """
    sizes = {DATA: data, FSDP: fsdp, SEQ: seq, TENSOR: tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ValueError(f"a mesh of {sizes} needs {need} devices; {len(devices)} available")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, devices=devices[:need],
                         axis_types=(AxisType.Auto,) * len(AXES))


def axis_size(mesh, name: str) -> int:
    """Size of axis `name` of `mesh` (1 when the mesh has no such axis)."""
    return int(mesh.shape[name]) if name in mesh.axis_names else 1


def batch_axes(mesh) -> tuple[str, ...]:
    """The axes of `mesh` that split a batch (data, fsdp) and have size > 1."""
    return tuple(a for a in BATCH_AXES if axis_size(mesh, a) > 1)


def batch_spec(mesh, batch: int, what: str = "batch"):
    """The spec entry of a batch dimension of size `batch` on `mesh` (a tuple of axis names,
    or None), after checking that the data-parallel size divides it."""
    axes = batch_axes(mesh)
    size = math.prod(axis_size(mesh, a) for a in axes)
    if batch % size:
        raise ValueError(
            f"{what} {batch} is not a multiple of the mesh's data-parallel size {size} (axes "
            f"{' × '.join(f'{a}={axis_size(mesh, a)}' for a in axes)}); pad the batch or use a "
            "mesh whose data axes divide it")
    return axes or None


def check_mesh(mesh) -> Mesh:
    """The mesh itself, after checking it is a `jax.sharding.Mesh` (or an `AbstractMesh`, for
    specs only) with Auto axes."""
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. longmamba_jax.make_mesh), got "
                        f"{type(mesh).__name__}")
    explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t != AxisType.Auto]
    if explicit:
        raise ValueError(f"mesh axes {explicit} are not of type Auto; build the mesh with "
                         "longmamba_jax.make_mesh or jax.make_mesh(..., axis_types=(AxisType.Auto,"
                         " ...))")
    return mesh


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are placed on with a `NamedSharding` (the first array's),
    or None when they are on one device, unplaced or traced."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array):
            continue
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
        return None
    return None


def resolve_mesh(params, mesh) -> Mesh | None:
    """`mesh` when given, else the mesh the weights were placed on (`shard`), else None."""
    if mesh is not None:
        return check_mesh(mesh)
    found = mesh_of(getattr(params, "weights", params))
    return None if found is None else check_mesh(found)


@contextlib.contextmanager
def mesh_scope(mesh):
    """`jax.set_mesh(mesh)` for the calls inside (nothing when mesh is None): the kernels
    read the mesh from there (`longmamba_jax.sharding.kernels`)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield


def place_batch(mesh, *arrays):
    """Each array (leading batch axis; None passes) placed on `mesh` with its batch split over
    the data axes; traced arrays are left to the caller's program."""
    if mesh is None:
        return arrays
    out = []
    for a in arrays:
        if a is None or isinstance(a, jax.core.Tracer):
            out.append(a)
            continue
        spec = P(batch_spec(mesh, a.shape[0]), *([None] * (a.ndim - 1)))
        out.append(jax.device_put(a, NamedSharding(mesh, spec)))
    return tuple(out)
