"""Data-parallel reductions over a device ``Mesh`` with ``jax.shard_map`` + ``psum``.

Every dataset-wide sum in jaxforget (gradients, Gauss-Newton products, Fisher products) goes through
:func:`data_parallel_sum`: the dataset is laid out once as global arrays sharded along a ``data`` axis,
each device scans over its local batches, and one ``psum`` combines the partial sums. The same code
runs on one device, on fake CPU devices in tests, on a GPU host, and multi-host under
``jax.distributed`` (each process then holds its local rows; see :func:`shard_rows`).

Padding rows carry weight 0, so the shapes stay fixed across forget requests (nothing recompiles);
sums divide by the true weighted count, never by the padded size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxforget import compat

PyTree = Any
DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D data-parallel mesh over the first ``num_devices`` devices (all by default).

    The axis is of ``Auto`` type, so ``shard_map`` accepts inputs whatever their sharding.

    Args:
      num_devices: how many devices to use; ``None`` for every device of every process.
      axis_name: the name of the data axis.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(num_devices,)``.

    Examples:
      >>> mesh = make_mesh(1)
      >>> mesh.shape["data"]
      1
    """
    n = jax.device_count() if num_devices is None else int(num_devices)
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"num_devices={num_devices} but {jax.device_count()} device(s) are available.")
    kwargs = {}
    axis_types = compat.auto_axis_types(1)
    if axis_types is not None:
        kwargs["axis_types"] = axis_types
    return jax.make_mesh((n,), (axis_name,), devices=jax.devices()[:n], **kwargs)


def padded_size(n: int, mesh: Mesh, batch_size: int) -> int:
    """Rows after padding ``n`` to a whole number of per-device batches on every device."""
    unit = mesh.size * batch_size
    return max(unit, -(-n // unit) * unit)


def shard_rows(tree: PyTree, mesh: Mesh, batch_size: int, *, pad_value: float = 0) -> PyTree:
    """Pads host arrays along axis 0 and places them on the mesh, sharded along the data axis.

    Args:
      tree: pytree of host arrays sharing the leading dimension ``n``.
      mesh: the data-parallel mesh.
      batch_size: per-device batch size used by :func:`data_parallel_sum`.
      pad_value: value of the padding rows (pair padding with a zero weight).

    Returns:
      The same pytree of global ``jax.Array`` s with leading dimension :func:`padded_size`.
    """
    leaves = jax.tree.leaves(tree)
    n = int(np.shape(leaves[0])[0])
    if any(int(np.shape(a)[0]) != n for a in leaves):
        raise ValueError("shard_rows: every leaf must have the same leading dimension.")
    n_pad = padded_size(n, mesh, batch_size)
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))

    def put(a):
        a = np.asarray(a)
        pad = np.full((n_pad - n, *a.shape[1:]), pad_value, dtype=a.dtype)
        full = np.concatenate([a, pad], axis=0)
        if jax.process_count() == 1:
            return jax.device_put(full, sharding)
        # Multi-host: every process holds the whole (small) host copy and contributes its own rows.
        rows = np.array_split(np.arange(n_pad), jax.process_count())[jax.process_index()]
        return jax.make_array_from_process_local_data(sharding, full[rows], (n_pad, *a.shape[1:]))

    return jax.tree.map(put, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places a pytree fully replicated on the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)


def data_parallel_sum(
    batch_fn: Callable[[PyTree, PyTree], PyTree],
    mesh: Mesh,
    batch_size: int,
) -> Callable[[PyTree, PyTree], PyTree]:
    r"""Builds ``fn(args, data) = Σ_batches batch_fn(args, batch)`` over all devices.

    .. math::  \mathrm{fn}(a, D) = \sum_{d \in \text{devices}} \sum_{B \subset D_d} \mathrm{batch\_fn}(a, B)

    ``args`` are replicated (parameters, tangents); ``data`` is a pytree of arrays whose leading
    dimension is sharded along the mesh's data axis and divisible by ``mesh.size * batch_size``
    (see :func:`shard_rows`). ``batch_fn`` must return a *sum* over its batch (weight padding rows
    by 0 to exclude them). ``args`` are marked device-varying before use, so derivatives taken inside
    ``batch_fn`` are per-device partial sums and the single ``psum`` counts them exactly once.

    Args:
      batch_fn: ``(args, batch) -> pytree of sums``; ``batch`` leaves have leading dim ``batch_size``.
      mesh: 1-D data-parallel mesh.
      batch_size: per-device batch size.

    Returns:
      A traceable function ``(args, data) -> pytree`` (wrap it in ``jax.jit`` at the call site).

    Examples:
      >>> mesh = make_mesh(1)
      >>> total = data_parallel_sum(lambda a, b: (b * a).sum(), mesh, batch_size=2)
      >>> float(total(jnp.float32(2.0), jnp.arange(4.0)))
      12.0
    """
    axis = mesh.axis_names[0]

    def local(args, data):
        args = compat.mark_varying(args, axis)
        n_local = jax.tree.leaves(data)[0].shape[0]
        num_batches = n_local // batch_size
        batched = jax.tree.map(lambda a: a.reshape(num_batches, batch_size, *a.shape[1:]), data)
        first = jax.tree.map(lambda a: a[0], batched)
        rest = jax.tree.map(lambda a: a[1:], batched)
        # Seeding the carry with the first batch keeps its varying-axes type equal to batch_fn's output.
        acc = batch_fn(args, first)

        def body(carry, batch):
            return jax.tree.map(jnp.add, carry, batch_fn(args, batch)), None

        acc, _ = jax.lax.scan(body, acc, rest)
        return jax.lax.psum(acc, axis)

    return compat.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P())
