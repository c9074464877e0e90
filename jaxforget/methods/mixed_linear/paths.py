"""How a forget request is solved on each path, and the exact solves the paths are judged against.

Each request path returns a :class:`Step` (the new float32 weights and host diagnostics) for the retained rows of a
ledger ``removed_by``:

* :func:`direct_request`: the exact removal from the cached factorisation (:mod:`.direct`);
* :func:`cg_request`: one float32 Newton-CG step (:func:`jaxforget.solvers.newton_cg_step`);
* :func:`refined_request`: float32 CG corrections refined by float64 gradients
  (:func:`jaxforget.solvers.refined_newton`);
* :func:`sgd_request`: the paper's SGD on the auxiliary quadratic (:mod:`.sgd`).

:func:`newton_solve` (the Newton-CG solve from any start, in float32 or float64) and :func:`reference_solve` (the
retrain oracle: a fresh factorisation when the size allows, else float64 CG) are ``MixedLinear.solve`` and
``MixedLinear.reference_solve``. Every host-to-device copy here is explicit (``replicate``, ``scalar``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

from jaxforget import compat, errors, evaluate, kernels, ledger, solvers
from jaxforget.methods.mixed_linear import direct
from jaxforget.methods.mixed_linear import sgd as sgd_lib

if TYPE_CHECKING:
    from jaxforget.methods.mixed_linear.method import MixedLinear, MixedLinearState

PyTree = Any


class Step(NamedTuple):
    """One request's solve: new float32 weights (replicated) and its diagnostics (host values)."""

    w: PyTree
    rel: float
    grad_norm: float
    step_norm: float
    iterations: int
    passes: float


def fail(error: type[Exception], on_fail: str, message: str) -> None:
    """Raises ``error(message)``, or warns with ``on_fail="warn"``."""
    if on_fail == "raise":
        raise error(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def newton_solve(ml: MixedLinear, state: MixedLinearState, *, w_start: PyTree | None = None, dtype=jnp.float32,
                 tol: float | None = None, atol: float = 0.0, maxiter: int | None = None, on_fail: str | None = None,
                 precondition: bool = True, w_ref: PyTree | None = None, ref_tol: float = 0.0
                 ) -> tuple[PyTree, kernels.CGInfo]:
    """The exact minimiser ``w*`` of ``L_{D_r}`` for the state's retained set, by one Newton-CG step.

    Starting from ``w_start`` (zeros: a CG retrain from scratch; the previous optimum: a warm start), one Newton
    step lands on ``w*`` up to the CG tolerance, which is relative to the gradient at ``w_start``. With
    ``dtype=jnp.float64`` the whole solve runs in float64 (the reference for every accuracy claim).
    ``precondition=False`` forces plain CG. Benchmarks pass the exact retrain as ``w_ref`` to stop CG at relative
    error ``ref_tol`` (iterations to a given error).

    Returns:
      ``(w, info)`` with ``w`` in ``dtype``.

    Raises:
      CGNotConvergedError: per ``on_fail`` (default ``config.on_fail``).
    """
    pb, removed_by = ml.problem, state.ledger.removed_by
    tol = ml.config.tol if tol is None else tol
    maxiter = ml.config.maxiter if maxiter is None else maxiter
    with compat.enable_x64() if dtype == jnp.float64 else contextlib.nullcontext():
        lin, fix = pb.split_as(state.core, dtype)
        w0 = pb.zeros_like(lin) if w_start is None else pb.replicate(optax.tree.cast(w_start, dtype))
        ref = None if w_ref is None else (pb.replicate(optax.tree.cast(w_ref, dtype)), pb.scalar(ref_tol, dtype))
        w, _, _, info = pb.newton_step(
            lin, fix, w0, *pb.data(dtype), pb.weights(removed_by, dtype), pb.count(removed_by, dtype),
            pb.scalar(tol, dtype), pb.scalar(atol, dtype), pb.scalar(maxiter, jnp.int32),
            ml.preconditioner(state, dtype) if precondition else None, ref)
        kernels.check_converged(info, what="retrain solve", on_fail=on_fail or ml.config.on_fail)
        return w, info


def reference_solve(ml: MixedLinear, state: MixedLinearState, *, w_start: PyTree | None = None, tol: float = 1e-11,
                    maxiter: int | None = None, on_fail: str = "raise") -> tuple[PyTree, dict]:
    """The retrain oracle: the float64 minimiser on the retained rows by the cheapest exact route.

    When the smaller of the reduced systems has at most ``direct_max_size`` rows it is factorised afresh
    (:func:`.direct.refactorised_solution`; ``config.direct_space`` forces a space), else float64 CG to ``tol``
    from ``w_start``. It shares no code with the removal formulas (Woodbury, Schur complement), so a forget is
    judged by an independent computation.

    Returns:
      ``(w*, info)``: float64 weights and ``{"route", "iterations", "rel_residual", "converged"}``. A factorised
      route reports ``‖g_r(w*)‖/‖g_r(0)‖`` from a float64 gradient pass and counts as converged at
      ``max(tol, 1e-8)`` (its rounding floor can sit above a tol meant for CG).
    """
    pb, removed_by = ml.problem, state.ledger.removed_by
    choice = ml.choose_solver(state.core)
    num_rows = int(ledger.retain_mask(removed_by).sum()) * pb.num_classes
    if min(choice.num_params, num_rows) > choice.direct_max_size:
        w, info = newton_solve(ml, state, w_start=w_start, dtype=jnp.float64, tol=tol, maxiter=maxiter,
                               on_fail=on_fail)
        return w, {"route": "cg", "iterations": int(info.iterations), "rel_residual": float(info.rel_residual),
                   "converged": bool(info.converged)}
    forced = ml.config.direct_space
    route = forced if forced != "auto" else ("primal" if choice.num_params <= num_rows else "dual")
    with compat.enable_x64(), compat.host_blas_threads(None):  # a fresh factorisation: every core
        w = direct.refactorised_solution(pb, ml._cache.kernels, state.core, removed_by, route)
        errors.check_finite(w, "exact retrain weights")
        lin, fix, x, t, c, count = pb.float64(state.core, removed_by)
        g_norm = float(pb.gradient_norm(lin, fix, w, x, t, c, count))
        b_norm = float(pb.gradient_norm(lin, fix, pb.zeros_like(w), x, t, c, count))
    rel = g_norm / max(b_norm, 1e-300)
    return w, {"route": route, "iterations": 0, "rel_residual": rel, "converged": rel <= max(tol, 1e-8)}


def direct_request(ml: MixedLinear, state: MixedLinearState, removed_by, request: int, path: str) -> Step:
    """The exact removal from the factor and the stream (:func:`.direct.direct_solve`), checked against ``tol``.

    Raises:
      DirectSolveError: the residual misses ``tol`` after refinement (``on_fail="warn"`` accepts).
    """
    cfg = ml.config
    w64, rel, g_norm, passes = ml._direct_solve(state, removed_by, state.w_u)
    if not rel <= cfg.tol:
        fail(errors.DirectSolveError, cfg.on_fail,
             f"forget request {request} ({path}): relative residual {rel:.3g} > tol {cfg.tol:g}; the factorised "
             "system is too ill-conditioned for float64 at this mu (use solver='cg').")
    return Step(ml.problem.replicate(optax.tree.cast(w64, jnp.float32)), rel, g_norm,
                evaluate.weight_distance(w64, state.w_u)["l2"], 0, passes)


def cg_request(ml: MixedLinear, state: MixedLinearState, removed_by, request: int) -> Step:
    """One float32 Newton-CG step (passes: the gradient, the CG products and the true-residual check).

    Raises:
      CGNotConvergedError: per ``config.on_fail``.
    """
    cfg, pb = ml.config, ml.problem
    lin, fix, x, t, c, count = pb.float32(state.core, removed_by)
    w, g_norm, v_norm, cg = pb.newton_step(
        lin, fix, pb.replicate(state.w_u), x, t, c, count, pb.scalar(cfg.tol, jnp.float32),
        pb.scalar(0.0, jnp.float32), pb.scalar(cfg.maxiter, jnp.int32), ml.preconditioner(state), None)
    kernels.check_converged(cg, what=f"forget request {request} (Newton-CG)", on_fail=cfg.on_fail)
    iterations = int(cg.iterations)
    return Step(w, float(cg.rel_residual), float(g_norm), float(v_norm), iterations, iterations + 2.0)


def refined_request(ml: MixedLinear, state: MixedLinearState, removed_by, request: int) -> Step:
    """Mixed-precision refinement (``cg_precision="refined"``): float32 (preconditioned) CG corrections to
    ``cg_inner_tol``, each followed by a float64 gradient pass, until the float64 residual meets ``tol`` (at most
    ``cg_refine`` corrections and ``maxiter`` CG iterations in all).

    Raises:
      CGNotConvergedError: tol missed (``on_fail="warn"`` accepts). NonFiniteError: NaN/Inf in a gradient or
        correction.
    """
    cfg, pb = ml.config, ml.problem
    lin32, fix32, x32, _, c32, count32 = pb.float32(state.core, removed_by)
    pre, inner_tol, done = ml.preconditioner(state), pb.scalar(cfg.cg_inner_tol, jnp.float32), [0]
    with compat.enable_x64():
        lin, fix, x, t, c, count = pb.float64(state.core, removed_by)

        def gradient(w):
            g, _ = pb.gradient(lin, fix, w, x, t, c, count)
            errors.check_finite(g, "residual gradient g")
            return g, float(pb.norm(g))

        def correction(g, budget):
            rhs = pb.replicate(optax.tree.cast(g, jnp.float32))
            delta, info = pb.hessian_solve(lin32, fix32, rhs, x32, c32, count32, inner_tol,
                                           pb.scalar(budget, jnp.int32), pre)
            done[0] += 1
            errors.check_finite(delta, f"correction {done[0]} of forget request {request}")
            return pb.replicate(optax.tree.cast(delta, jnp.float64)), int(info.iterations)

        out = solvers.refined_newton(pb.replicate(optax.tree.cast(state.w_u, jnp.float64)), gradient, correction,
                                     tol=cfg.tol, max_corrections=int(cfg.cg_refine), maxiter=int(cfg.maxiter))
    if not out.rel_residual <= cfg.tol:
        fail(errors.CGNotConvergedError, cfg.on_fail,
             f"forget request {request} (refined Newton-CG) did not converge: float64 relative residual "
             f"{out.rel_residual:.3e} after {out.corrections} corrections and {out.iterations} CG iterations; raise "
             "maxiter or cg_refine, or add a preconditioner.")
    return Step(pb.replicate(optax.tree.cast(out.w, jnp.float32)), out.rel_residual, out.grad_norm,
                evaluate.weight_distance(out.w, state.w_u)["l2"], out.iterations, out.passes)


def sgd_request(ml: MixedLinear, state: MixedLinearState, removed_by, request: int) -> Step:
    """The paper's solver: SGD on ``½vᵀH_B v − gᵀv`` with the exact ``g``, step ``1/β̂`` with cosine decay
    (passes: the exact ``g``, the SGD epochs and the residual check; ``β`` is computed once per core)."""
    cfg, pb = ml.config, ml.problem
    lin, fix, x, t, c, count = pb.float32(state.core, removed_by)
    w_u = pb.replicate(state.w_u)
    g, _ = pb.gradient(lin, fix, w_u, x, t, c, count)
    errors.check_finite(g, "residual gradient g")
    beta_full = ml._cache.beta(state.core, lambda: ml.largest_eigenvalue(
        ml._with_removed(state, np.zeros(pb.num_train, np.int32))))
    beta = sgd_lib.beta_bound(beta_full, cfg.mu, pb.num_train, int(ledger.retain_mask(removed_by).sum()),
                              cfg.regularization == "fixed")
    v = ml._sgd.run(lin, fix, c, pb.zeros_like(g), epochs=cfg.sgd_epochs, batch_size=cfg.sgd_batch_size,
                    learning_rate=1.0 / beta, momentum=0.0, seed=request, g_exact=g)
    g_norm, v_norm = float(pb.norm(g)), float(pb.norm(v))
    resid = float(pb.norm(optax.tree.sub(pb.hessian_matvec(lin, fix, v, x, c, count), g)))
    return Step(optax.tree.sub(w_u, v), resid / max(g_norm, 1e-30), g_norm, v_norm,
                cfg.sgd_epochs * (pb.num_padded // cfg.sgd_batch_size), 1.0 + cfg.sgd_epochs + 1.0)


__all__ = ["Step", "cg_request", "direct_request", "newton_solve", "reference_solve", "refined_request",
           "sgd_request"]
