"""The mixed-linear method's config section: every field with its default, and its validation."""

from __future__ import annotations

import ml_collections

from jaxforget import errors
from jaxforget.methods import base

SOLVERS = ("auto", "direct", "cg", "sgd")

#: Fields that only choose how a request is solved: they change neither the original nor the exact retrain, so
#: variants that differ only in them share originals and cached oracles.
SOLVER_ONLY_FIELDS = frozenset({
    "name", "sigma", "solver", "direct_refine", "direct_inverse", "direct_check", "tol", "maxiter", "cg_precision",
    "cg_inner_tol", "cg_refine", "on_fail", "preconditioner", "nystrom_rank", "sgd_epochs", "sgd_batch_size",
})


def default_method_config() -> ml_collections.ConfigDict:
    """The method section of a config (see ``configs/mixed_linear_digits.py``)."""
    c = ml_collections.ConfigDict()
    c.name = "mixed_linear"
    c.linearize = "all"  # models.linearize_predicate spec: "all", "head", "last:k", "re:<regex>"
    c.mu = 1e-4  # L2 on w_u, mean-loss units
    # Loss normaliser: "fixed" divides by n = |D| (the training set before any request) for every retrain,
    # i.e. a fixed ridge λ = n·μ in sum form, so a request is a low-rank change of the normal equations
    # (what the direct solver needs); "retained" divides by |D_r| (the paper's mean over the current data,
    # whose effective ridge changes with every request). Both agree before the first request.
    c.regularization = "fixed"
    c.target_scale = 1.0  # α: targets are α·one-hot
    c.sigma = 0.0  # noise std added to w_u after each request
    c.batch_size = 256  # per-device batch of the full-pass kernels
    # Forget solver: "auto" (direct when the smaller Gram matrix has at most direct_max_size rows and
    # regularization is "fixed", else CG), "direct" (factorised primal/dual Gram + exact row removal),
    # "cg" (matrix-free Newton-CG) or "sgd" (the paper's).
    c.solver = "auto"
    c.direct_max_size = 0  # 0: 20,000 on CPU, 40,000 on GPU/TPU (the factor is size² float64 numbers)
    c.direct_space = "auto"  # "primal" (P×P) / "dual" (N×N) force a space; "auto" takes the smaller
    c.direct_refine = 3  # iterative-refinement steps allowed when the float64 residual misses tol
    c.direct_block = 32  # samples per block of Gram columns (memory ~ block·K tangents at once)
    # Dual path: hold the explicit inverse M⁻¹ instead of its Cholesky factor ("always"/"never"/"auto"; the
    # primal path always holds A⁻¹, a P×P matrix that requests update by Woodbury with their own rows). A
    # request then gathers its removal columns (O(N·|F|K)) instead of 2N² flops per column of triangular
    # solves. Building it costs ~2N³/3 flops more than the factor, so "auto" takes it on accelerators, and on
    # CPU when the planned stream (reserve_capacity) removes more than N/3 rows.
    c.direct_inverse = "auto"
    # Primal path: how a request's result is checked. "gram": from the held A = JᵀJ + λI and the Jacobian rows
    # of the removed samples, g_r(w) = (A w − Σ_F J_iᵀJ_i w − b_R)/n (no pass over the data; ~P² reads);
    # "data": float64 gradient passes over the retained data; "auto": whichever one measured faster at build
    # (a frozen CNN backbone makes a data pass costly; a wide MLP head makes P² reads costly). "auto" decides by
    # timing, so two processes may check differently; pin it where requests must reproduce bit for bit.
    c.direct_check = "auto"
    c.tol = 1e-5  # CG: ‖H v − g‖ ≤ tol·‖g‖
    c.maxiter = 3000
    # CG arithmetic: "float32" (one Newton-CG solve; its residual recurrence stalls well above float64 accuracy
    # on ill-conditioned systems) or "refined" (mixed-precision iterative refinement: float32 CG solves of the
    # correction to cg_inner_tol, each followed by a float64 gradient pass on the retained data, until the
    # float64 residual meets tol; at most cg_refine corrections, maxiter iterations in all).
    c.cg_precision = "float32"
    c.cg_inner_tol = 1e-2
    c.cg_refine = 10
    c.on_fail = "raise"  # or "warn"
    # The gold-standard retrain (retrain(), the oracle): a fresh float64 factorisation when min(P, N) allows, else
    # float64 CG to retrain_tol from zero.
    c.retrain_tol = 1e-11
    c.retrain_maxiter = 50000
    c.sigma_sweep = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # readouts: the last request's output under each noise std
    # CG preconditioner: "none", or "nystrom" (rank-r randomized Nyström sketch of the Gauss-Newton term,
    # built once from core data, which is never forgotten, and reused by every request).
    c.preconditioner = "none"
    c.nystrom_rank = 200
    c.sgd_epochs = 3  # SGD solver: passes per request (paper: 2-3)
    c.sgd_batch_size = 256
    c.core = ml_collections.ConfigDict(
        dict(epochs=60, batch_size=64, learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
    )
    c.user = ml_collections.ConfigDict(
        # "auto": the forget solver's exact path (the direct factorisation when it is chosen, which also
        # yields the full-data solution), else "reference" (a fresh primal/dual factorisation when
        # min(P, N) <= direct_max_size, else float64 CG); "cg": float64 CG (a float32 CG from zero stalls far
        # from the optimum on ill-conditioned systems); "sgd": the paper's recipe (SGD + momentum, cosine).
        dict(solver="auto", tol=1e-10, maxiter=30000, epochs=50, batch_size=128, learning_rate=0.01, momentum=0.9)
    )
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Every field of :func:`default_method_config`, checked once (types, finite numbers, enumerations).

    Raises:
      ConfigError: naming the first invalid field.
    """
    base.validate_fields(config, default_method_config(), "method 'mixed_linear'")
    base.check_choice(config.solver, SOLVERS, "method.solver")
    base.check_choice(config.regularization, ("fixed", "retained"), "method.regularization")
    base.check_choice(config.direct_check, ("auto", "gram", "data"), "method.direct_check")
    base.check_choice(config.direct_space, ("auto", "primal", "dual"), "method.direct_space")
    base.check_choice(config.direct_inverse, ("auto", "always", "never"), "method.direct_inverse")
    base.check_choice(config.preconditioner, ("none", "nystrom"), "method.preconditioner")
    base.check_choice(config.cg_precision, ("float32", "refined"), "method.cg_precision")
    base.check_choice(config.on_fail, ("raise", "warn"), "method.on_fail")
    base.check_choice(config.user.solver, ("auto", "direct", "reference", "cg", "sgd"), "method.user.solver")
    if config.solver == "direct" and config.regularization != "fixed":
        raise errors.ConfigError(
            "solver='direct' needs regularization='fixed': with the per-retained normaliser every request "
            "shifts the ridge of all rows, which is not a low-rank change of the factorised matrix."
        )
    base.check_range(config.mu, "method.mu", low=0, low_open=True, why="it makes the user problem strongly convex")
    base.check_range(config.sigma, "method.sigma", low=0)
    base.check_range(config.target_scale, "method.target_scale", low=0, low_open=True)
    base.check_range(config.tol, "method.tol", low=0, low_open=True)
    base.check_range(config.retrain_tol, "method.retrain_tol", low=0, low_open=True)
    base.check_range(config.retrain_maxiter, "method.retrain_maxiter", low=1)
    base.check_range(config.cg_inner_tol, "method.cg_inner_tol", low=0, low_open=True)
    for field in ("batch_size", "maxiter", "direct_block", "nystrom_rank", "sgd_batch_size"):
        base.check_range(config[field], f"method.{field}", low=1)
    for field in ("direct_max_size", "direct_refine", "cg_refine", "sgd_epochs"):
        base.check_range(config[field], f"method.{field}", low=0)
    for section in ("core", "user"):
        sec = config[section]
        base.check_range(sec.epochs, f"method.{section}.epochs", low=0)
        base.check_range(sec.batch_size, f"method.{section}.batch_size", low=1)
        base.check_range(sec.learning_rate, f"method.{section}.learning_rate", low=0)
        base.check_range(sec.momentum, f"method.{section}.momentum", low=0, high=1)
    base.check_range(config.core.weight_decay, "method.core.weight_decay", low=0)
    base.check_range(config.user.tol, "method.user.tol", low=0, low_open=True)
    base.check_range(config.user.maxiter, "method.user.maxiter", low=1)


__all__ = ["SOLVERS", "SOLVER_ONLY_FIELDS", "default_method_config", "validate"]
