r"""Shared solvers for regularised least-squares problems, written against an abstract problem.

Every method that removes samples from a (linearized) quadratic model solves the same problem: with per-sample
Jacobian rows ``J_i`` (``[K, P]``), targets ``t_i`` (``[K]``) and a ridge ``λ > 0``,

.. math::  \min_w\ \tfrac12 \sum_{i \in R} \lVert J_i w - t_i \rVert^2 + \tfrac12 \lambda \lVert w \rVert^2 ,

over the retained samples ``R``. Nothing here knows what produced ``J`` (a linearized network, a Fisher or
Gauss-Newton curvature, stored per-example gradients); a caller exposes the problem in one of three ways:

* **matrix-free**: ``gradient(w)`` (the gradient of the objective, in whatever normalisation the caller uses)
  and ``matvec(v)`` (its Hessian times ``v``), both traceable. :func:`newton_cg_step` is one Newton step by
  conjugate gradients; :func:`refined_newton` is its mixed-precision iterative refinement (low-precision
  corrections, high-precision residuals); :func:`nystrom_sketch` / :func:`nystrom_precond` build and apply a
  randomized Nyström preconditioner, held by a :class:`PreconditionerCache`.
* **rows** (primal space, ``A = JᵀJ + λI`` held explicitly) and **Gram** (dual space, ``M = JJᵀ + λI``): the
  direct solves and exact row removal (Woodbury, Schur complement) in :mod:`jaxforget.woodbury`.

Nothing here holds hidden state: the preconditioner cache only saves time and is keyed by what built it.

Mixed-linear forgetting (:mod:`jaxforget.methods.mixed_linear`) uses all of it; SSSE-style removal (Newton steps
with Fisher / Gauss-Newton curvature, Sherman–Morrison / Woodbury removal of stored gradients) uses the same
functions with its own ``matvec`` and rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxforget import kernels

PyTree = Any
Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# --------------------------------------------------------------------------------------------------
# Matrix-free: Newton-CG and its mixed-precision refinement
# --------------------------------------------------------------------------------------------------


def newton_cg_step(
    gradient: Callable[[PyTree], PyTree],
    matvec: Callable[[PyTree], PyTree],
    w: PyTree,
    *,
    tol: float | Array,
    atol: float | Array = 0.0,
    maxiter: int | Array,
    precond: Callable[[PyTree], PyTree] | None = None,
    w_ref: PyTree | None = None,
    ref_tol: float | Array = 0.0,
) -> tuple[PyTree, Array, Array, kernels.CGInfo]:
    r"""One Newton step :math:`w - H^{-1} g(w)` with the solve by conjugate gradients (traceable).

    For a quadratic objective the step lands on the minimiser from *any* ``w``, up to the CG tolerance, which is
    relative to ``‖g(w)‖``.

    Args:
      gradient: ``w ↦ g(w)``, the objective's gradient (a pytree shaped like ``w``).
      matvec: ``v ↦ H v``, the objective's Hessian (SPD) times ``v``.
      w: the current weights.
      tol, atol, maxiter: CG stopping rule (:func:`jaxforget.kernels.cg_solve`).
      precond: ``r ↦ P⁻¹ r`` (e.g. :func:`nystrom_precond`), or ``None``.
      w_ref: a known minimiser (benchmarks): CG also stops once the step is within ``ref_tol`` of ``w − w_ref``.
      ref_tol: relative error at which ``w_ref`` stops CG.

    Returns:
      ``(w_new, ‖g(w)‖, ‖step‖, info)``.

    Examples:
      >>> h = jnp.array([[3., 1.], [1., 2.]]); b = jnp.array([1., 1.])
      >>> w, g_norm, _, info = newton_cg_step(lambda w: h @ w - b, lambda v: h @ v, jnp.zeros(2), tol=1e-6,
      ...                                     maxiter=10)
      >>> [round(float(v), 4) for v in w], bool(info.converged)
      ([0.2, 0.4], True)

    References:
      Golatkar et al., Mixed-Privacy Forgetting in Deep Networks, CVPR 2021, eq. 11.
    """
    g = gradient(w)
    x_ref = None if w_ref is None else optax.tree.sub(w, w_ref)
    v, info = kernels.cg_solve(matvec, g, tol=tol, atol=atol, maxiter=maxiter, precond=precond, x_ref=x_ref,
                               ref_tol=ref_tol)
    return optax.tree.sub(w, v), optax.tree.norm(g), optax.tree.norm(v), info


@dataclasses.dataclass(frozen=True)
class RefinedNewton:
    """Outcome of :func:`refined_newton` (host values).

    Attributes:
      w: the refined weights (the high-precision iterate).
      rel_residual: ``‖g(w)‖ / ‖g(w_0)‖`` from the high-precision gradient.
      grad_norm: ``‖g(w_0)‖``.
      iterations: inner solver iterations in all.
      passes: gradient evaluations plus inner iterations (each a pass over the data for a data-defined problem).
      corrections: corrections applied.
    """

    w: PyTree
    rel_residual: float
    grad_norm: float
    iterations: int
    passes: float
    corrections: int


def refined_newton(
    w: PyTree,
    gradient: Callable[[PyTree], tuple[PyTree, float]],
    correction: Callable[[PyTree, int], tuple[PyTree, int]],
    *,
    tol: float,
    max_corrections: int,
    maxiter: int,
) -> RefinedNewton:
    r"""Mixed-precision iterative refinement of a Newton step (host loop).

    ``w ← w − δ`` with ``H δ ≈ g(w)`` solved cheaply (e.g. float32 CG to a loose relative tolerance), where
    ``g`` is evaluated in high precision (e.g. float64). The cheap solve only has to shrink the *current*
    residual by its own tolerance, which it reaches before its rounding matters; the high-precision gradient
    measures the true residual, so the iterate converges to high-precision accuracy at the cheap solve's cost.

    Args:
      w: start (high precision).
      gradient: ``w ↦ (g(w), ‖g(w)‖)`` in high precision (the norm as a host float).
      correction: ``(g, budget) ↦ (δ, iterations)``: an approximate ``H⁻¹ g`` in ``w``'s dtype, spending at most
        ``budget`` inner iterations.
      tol: target of ``‖g(w)‖ / ‖g(w_0)‖``.
      max_corrections: corrections allowed.
      maxiter: inner iterations allowed in all.

    Returns:
      A :class:`RefinedNewton`; the caller decides what a missed ``tol`` means.

    Examples:
      >>> h = jnp.array([[3., 1.], [1., 2.]]); b = jnp.array([1., 1.])
      >>> grad = lambda w: (h @ w - b, float(jnp.linalg.norm(h @ w - b)))
      >>> rough = lambda g, budget: (jnp.linalg.solve(h, g) * 0.9, 1)  # a 10 % error per correction
      >>> out = refined_newton(jnp.zeros(2), grad, rough, tol=1e-6, max_corrections=20, maxiter=100)
      >>> [round(float(v), 4) for v in out.w], out.corrections
      ([0.2, 0.4], 6)
    """
    g, g_norm = gradient(w)
    g0 = max(float(g_norm), 1e-300)
    rel, iterations, passes, steps = 1.0, 0, 1.0, 0
    while rel > tol and steps < int(max_corrections) and iterations < int(maxiter):
        delta, used = correction(g, int(maxiter) - iterations)
        w = optax.tree.sub(w, delta)
        g, g_norm = gradient(w)
        rel = float(g_norm) / g0
        iterations += int(used)
        passes += int(used) + 1.0
        steps += 1
    return RefinedNewton(w=w, rel_residual=rel, grad_norm=g0, iterations=iterations, passes=passes,
                         corrections=steps)


def iterative_refinement(
    w: Any,
    check: Callable[[Any], float],
    correct: Callable[[Any], Any],
    *,
    tol: float,
    max_steps: int,
    min_steps: int = 0,
) -> tuple[Any, float, int]:
    """Checks ``w`` and corrects it until ``check(w) ≤ tol`` (after at least ``min_steps`` corrections).

    The loop of every direct solve that reuses one factorisation on its own residual: ``check`` measures a
    relative residual, ``correct`` applies the factor to it.

    Returns:
      ``(w, last check, corrections)``; at most ``max_steps`` corrections.

    Examples:
      >>> w, rel, steps = iterative_refinement(1.0, lambda w: abs(w - 2.0), lambda w: w + 0.5 * (2.0 - w),
      ...                                      tol=0.1, max_steps=10)
      >>> steps, rel <= 0.1
      (4, True)
    """
    steps = 0
    while True:
        rel = check(w)
        if (rel <= tol and steps >= min_steps) or steps >= max_steps:
            return w, rel, steps
        w = correct(w)
        steps += 1


# --------------------------------------------------------------------------------------------------
# Randomized Nyström preconditioner
# --------------------------------------------------------------------------------------------------


class Nystrom(NamedTuple):
    """A rank-r Nyström approximation ``A ≈ U diag(lam) Uᵀ`` of a PSD operator, in ravelled coordinates.

    Attributes:
      u: ``[P, r]`` orthonormal columns.
      lam: ``[r]`` non-negative eigenvalue estimates, descending.
    """

    u: Array
    lam: Array


def nystrom_sketch(
    matvec: Callable[[PyTree], PyTree], like: PyTree, rank: int, key: Array, *, chunk: int = 16
) -> Nystrom:
    r"""Randomized Nyström approximation of a PSD operator from ``rank`` products.

    With a Gaussian test matrix :math:`\Omega` (orthonormalised), :math:`Y = A\Omega` and a small shift
    :math:`\nu` for stability, :math:`A \approx Y_\nu (\Omega^\top Y_\nu)^{-1} Y_\nu^\top - \nu I`, factored
    by a Cholesky and a thin SVD. Only ``[P, rank]`` arrays are formed, never ``[P, P]``.

    Args:
      matvec: ``v ↦ A v`` for a PSD ``A`` (e.g. the Gauss-Newton data term, without damping).
      like: a pytree with the structure and dtype of ``v``.
      rank: sketch size ``r`` (number of products).
      key: PRNG key of the test matrix.
      chunk: products evaluated together (``lax.map`` batch size).

    Returns:
      A :class:`Nystrom` factorisation.

    Examples:
      >>> a = jnp.diag(jnp.array([100.0, 10.0, 1.0, 0.0]))
      >>> nys = nystrom_sketch(lambda v: a @ v, jnp.zeros(4), rank=4, key=jax.random.key(0))
      >>> [round(float(x), 2) for x in nys.lam[:3]]
      [100.0, 10.0, 1.0]

    References:
      Frangella, Tropp & Udell, Randomized Nyström Preconditioning, SIAM J. Matrix Anal. Appl. 2023, Alg. 2.1.
    """
    flat, unravel = ravel_pytree(like)
    p = flat.shape[0]
    omega = jax.random.normal(key, (p, rank), flat.dtype)
    omega, _ = jnp.linalg.qr(omega)
    apply_col = lambda col: ravel_pytree(matvec(unravel(col)))[0]
    y = jax.lax.map(apply_col, omega.T, batch_size=chunk).T  # [P, r]
    nu = jnp.sqrt(jnp.asarray(p, flat.dtype)) * jnp.finfo(flat.dtype).eps * jnp.linalg.norm(y)
    y_nu = y + nu * omega
    chol = jnp.linalg.cholesky(jnp.matmul(omega.T, y_nu, precision=HIGHEST))
    b = jax.scipy.linalg.solve_triangular(chol, y_nu.T, lower=True).T  # Y_ν C^{-T}
    u, s, _ = jnp.linalg.svd(b, full_matrices=False)
    return Nystrom(u=u, lam=jnp.maximum(s**2 - nu, 0.0))


def nystrom_precond(nys: Nystrom, mu: Array | float) -> Callable[[PyTree], PyTree]:
    r"""The inverse preconditioner :math:`P^{-1} r` for :math:`A + \mu I` from a Nyström factorisation.

    .. math::  P^{-1} = (\lambda_r + \mu)\, U (\Lambda + \mu I)^{-1} U^\top + (I - U U^\top)

    It maps the top-r eigendirections to ≈ 1 and leaves the rest scaled by 1, so the preconditioned
    system's condition number is about :math:`(\lambda_{r} + \mu)/\mu` instead of :math:`(\lambda_1 + \mu)/\mu`.

    Examples:
      >>> nys = Nystrom(u=jnp.eye(3)[:, :2], lam=jnp.array([99.0, 9.0]))  # A = diag(99, 9, 0), μ = 1
      >>> [round(v, 4) for v in nystrom_precond(nys, 1.0)(jnp.array([100.0, 1.0, 1.0])).tolist()]
      [10.0, 1.0, 1.0]
    """

    def apply(r_tree):
        r, unravel = ravel_pytree(r_tree)
        mu_ = jnp.asarray(mu, r.dtype)
        # r @ U rather than Uᵀ @ r: XLA:CPU runs the transposed matrix-vector product much slower.
        coef = jnp.matmul(r, nys.u, precision=HIGHEST)
        scaled = coef * ((nys.lam[-1] + mu_) / (nys.lam + mu_))
        return unravel(r + jnp.matmul(nys.u, scaled - coef, precision=HIGHEST))

    return apply


class PreconditionerCache:
    """Nyström sketches keyed by content: a cache that only saves time.

    A sketch is a deterministic function of what its key names (the problem's content, e.g. a fingerprint of
    the model it was built on, and its variant, e.g. the dtype), so a miss rebuilds exactly what a hit returns.
    One content key is held at a time (sketches are ``[P, r]`` matrices).

    Examples:
      >>> cache = PreconditionerCache()
      >>> built = []
      >>> make = lambda: built.append(1) or Nystrom(jnp.eye(2), jnp.ones(2))
      >>> _ = cache.get("core-a", "float32", make); _ = cache.get("core-a", "float32", make)
      >>> len(built), cache.get("core-b", "float32", make) is not None, len(built)
      (1, True, 2)
    """

    def __init__(self):
        self._key: Hashable | None = None
        self._entries: dict[Hashable, Nystrom] = {}
        #: Build time of the last sketch (seconds; one-off, reported apart from requests).
        self.seconds = 0.0

    def get(self, key: Hashable, variant: Hashable, build: Callable[[], Nystrom]) -> Nystrom:
        """The sketch for ``(key, variant)``, built by ``build()`` on a miss (and timed)."""
        if key != self._key:
            self._key, self._entries = key, {}
        if variant not in self._entries:
            start = time.perf_counter()
            sketch = jax.block_until_ready(build())
            self.seconds = time.perf_counter() - start
            self._entries[variant] = sketch
        return self._entries[variant]

    def clear(self) -> None:
        """Drops every sketch (the next :meth:`get` rebuilds)."""
        self._key, self._entries = None, {}

    def arrays(self) -> list[Nystrom]:
        """The held sketches (memory accounting)."""
        return list(self._entries.values())


__all__ = [
    "Nystrom", "PreconditionerCache", "RefinedNewton", "iterative_refinement", "newton_cg_step", "nystrom_precond",
    "nystrom_sketch", "refined_newton",
]
