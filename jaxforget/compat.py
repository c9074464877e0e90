"""Shims for JAX APIs that moved or changed between versions.

Everything version-dependent lives here so that the rest of the library reads like today's JAX:
``jax.shard_map`` (formerly ``jax.experimental.shard_map``), marking a replicated value as varying
inside ``shard_map`` (``jax.lax.pcast``, formerly ``pvary``), the float64 context and the CPU
device count for tests, and the thread count of the host BLAS that numpy and jaxlib's CPU LAPACK calls use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
import threadpoolctl

try:  # jax >= 0.6
    shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map  # noqa: F401, UP035


def mark_varying(tree, axis_name: str):
    """Marks a replicated pytree as device-varying along ``axis_name`` inside ``shard_map``.

    Without this, JAX treats gradients/transposes with respect to a replicated input as already
    summed over the axis, and an explicit ``psum`` would count them twice.
    """
    if hasattr(jax.lax, "pcast"):
        return jax.tree.map(lambda a: jax.lax.pcast(a, axis_name, to="varying"), tree)
    if hasattr(jax.lax, "pvary"):  # pragma: no cover - jax 0.6/0.7
        return jax.tree.map(lambda a: jax.lax.pvary(a, axis_name), tree)
    return tree  # pragma: no cover - very old jax: no varying-manual-axes tracking


@contextlib.contextmanager
def enable_x64(enabled: bool = True) -> Iterator[None]:
    """Context in which new arrays default to 64-bit (float64/int64)."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(enabled):
            yield
    else:  # pragma: no cover - older jax
        from jax.experimental import enable_x64 as _ctx

        with _ctx(enabled):
            yield


def x64_enabled() -> bool:
    """Whether 64-bit types are currently the default."""
    return bool(jax.config.read("jax_enable_x64"))


def set_cpu_device_count(n: int) -> None:
    """Asks for ``n`` CPU devices; must run before JAX initialises its backends."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except AttributeError:  # pragma: no cover - older jax
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"


def auto_axis_types(n_axes: int):
    """``axis_types`` for ``jax.make_mesh`` so that shard_map accepts unsharded inputs."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # pragma: no cover - older jax
        return None
    return (axis_type.Auto,) * n_axes


#: The ``jax.monitoring`` duration event recorded once per XLA compilation (jax._src.dispatch).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def add_duration_listener(callback) -> None:
    """Registers ``callback(event, seconds, **metadata)`` for every ``jax.monitoring`` duration event."""
    jax.monitoring.register_event_duration_secs_listener(callback)


def remove_duration_listener(callback) -> None:
    """Unregisters a callback of :func:`add_duration_listener`."""
    jax.monitoring.unregister_event_duration_listener(callback)


_blas_controller: threadpoolctl.ThreadpoolController | None = None


@contextlib.contextmanager
def host_blas_threads(limit: int | None = 1) -> Iterator[None]:
    """Context (or decorator) in which the host BLAS libraries run ``limit`` threads (``None``: one per core).

    Both OpenBLAS copies a process holds are covered: numpy's, and SciPy's, which jaxlib's CPU LAPACK
    kernels (Cholesky, LU, triangular solves inside jitted code) call. OpenBLAS worker threads spin for a
    while after every call, on the very cores XLA's CPU thread pool computes on, and slow down what XLA computes
    there (the benchmark JSON of the release that introduced this holds the measurement). So requests,
    and the jobs that time them, run host BLAS on one thread (its work per request is small), while the
    one-off factorisations ask for every core. OpenBLAS reads the count when a call runs, so a computation
    dispatched inside the context must finish inside it.
    """
    global _blas_controller
    if _blas_controller is None:
        import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's OpenBLAS, which jaxlib's LAPACK uses)

        _blas_controller = threadpoolctl.ThreadpoolController()
    with _blas_controller.limit(limits=limit if limit is not None else os.cpu_count(), user_api="blas"):
        yield
