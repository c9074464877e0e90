r"""SSSE calibration on scikit-learn digits: how much of the exact removal shift one SSSE step recovers.

For a request ``S`` (``k`` samples) and the retained data ``D_r``, the study measures the *unrecovered fraction*
(spec ``ssse.md`` §9)

.. math::  u(\hat\theta) = \frac{\lVert \hat\theta - \theta_r^\star \rVert}{\lVert \theta^\star - \theta_r^\star \rVert}
           \qquad (0: \text{the gold standard}, \; 1: \text{not erasing}),

with ``θ̂`` the SSSE step computed by the library (:meth:`Ssse.forget` from the trained state, with its curvature
built by :meth:`Ssse.build_curvature`), next to the retained gradient residual ``‖∇L_{D_r}(θ̂)‖`` and the
output-space distance to the gold standard. Objective (mean form): ``L_T(θ) = mean_{i∈T} ℓ_i(θ) + (λ_wd/2)‖θ‖²``.

Models, all in float64:

* ``logreg``: multinomial L2-regularised logistic regression (``MLP(hidden=())``, ``P = 650``) on the pixels as
  :func:`jaxforget.data.load_digits` gives them (``input_mean = 0``, ``input_std = 1``: no renormalisation). Convex:
  ``θ_r*`` is unique and the gold standard is the exact retrain, found by the same solver warm-started on ``D_r``.
* ``cnn``: a :class:`~jaxforget.models.SmallCNN` (GELU) trained by the classifier recipe in float32 (an ordinary
  training run picks the basin), then polished full-batch in float64 to ``‖∇L_D‖ ≤ tol`` (float32 stationarity error
  would be of the order of the small-``k`` shifts being measured, pitfall 3). Non-convex: a retrain from scratch
  lands in another basin and parameter distances to it are meaningless (pitfall 11), so the gold standard is the
  *minimiser of the retained objective in θ*'s basin*: the same full-batch solver on ``D_r`` warm-started from
  ``θ*``, to the same tolerance. That is the point SSSE's Newton step aims at; the activation distance to it on test
  and forget rows is reported next to the parameter-space fraction.

Solver (training polish and gold standards): full-batch L-BFGS (:func:`jaxforget.train.train_full_batch`) to a
moderate tolerance where asked (the network), then Newton-CG (:func:`minimise`: exact Hessian-vector products, a
dense Gauss-Newton preconditioner, a Levenberg-Marquardt shift away from a minimum) to ``tol``. For linear softmax
the Gauss-Newton matrix is the Hessian, and Newton converges from the initialisation in a few steps.

Tuning (pitfall 9): per setting, the training ids are cut once into a tuning half and an evaluation half; random-k
requests are drawn from their own half, whole-class requests from disjoint sets of classes, so in every setting the
tuning and evaluated requests share no id (both lists are in the JSON). The pair ``(ε, λ_rel)`` with the smallest
mean unrecovered fraction over the tuning requests is applied to the evaluated ones. For reference only, the
*oracle* scalar ``ε_o = ⟨Δ, θ_r* − θ*⟩ / ‖Δ‖²`` minimises ``u`` on the evaluated request itself (``Δ`` the ε = 1 step).

The step is linear in ``ε`` (acceptance test 9), so each (request, damping) is one library call at ``ε = 1`` whose
step is scaled over the ε grid. The damping is a field of the built curvature, ``λ = λ_rel · tr(C)/P``: each
curvature is built once with ``λ_rel = 1`` and the field scaled per ``λ_rel``. Requests run with
``downdate='raise'``: from the build parameters the downdate is exact, so the PSD clip would only cost an
eigendecomposition.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxforget import compat, errors, evaluate, kernels, models, progress, report, train
from jaxforget import data as data_lib
from jaxforget import mesh as mesh_lib
from jaxforget.methods.ssse import curvature as curv_lib
from jaxforget.methods.ssse import method as method_lib

MODELS = ("logreg", "cnn")
PLOT_NAME = "ssse_calibration.png"


def default_config(quick: bool = False) -> ml_collections.ConfigDict:
    """The study's config; ``quick``: the logistic regression only, fewer draws and a smaller grid (well under a
    minute on 2 CPU cores)."""
    common = dict(block_size=256, max_dense_params=4096, chunk=32)
    c = ml_collections.ConfigDict(dict(
        quick=bool(quick),
        seed=0,  # model initialisation and data order, request draws, the tuning/evaluation halves
        split_seed=0,  # data.make_splits (test fraction 0.2)
        models=MODELS,
        ks=(1, 10, 100),
        whole_class=True,
        draws=3,  # evaluated requests per setting
        tune_draws=3,  # held-out tuning requests per setting
        epsilons=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0),
        # lbfgs_*: a first full-batch L-BFGS phase before Newton (train.train_full_batch; 0 iterations: none).
        logreg=dict(weight_decay=1e-3, input_mean=0.0, input_std=1.0, damping=0.0, dampings=(0.0, 1e-4, 1e-3, 1e-2),
                    curvatures=("gauss_newton/dense", "empirical_fisher/dense", "hessian/dense"), tol=1e-12,
                    maxiter=100, lbfgs_tol=0.0, lbfgs_maxiter=0, **common),
        # damping: the ε = 1 column's λ_rel (0 for the convex model: the plain Newton step; the method's default for
        # the network, where damping is part of the method, pitfall 4). A smooth activation (GELU): the gold standard
        # is a stationary point found by Newton's method, which kinks would stall. λ_wd = 1e-2: with a weaker L2 the
        # polish needs many more L-BFGS iterations. "hessian/dense" is allowed (P ≤ a few thousand) but its
        # per-sample Hessian build and request downdates cost minutes on a CPU.
        cnn=dict(channels=(4, 8), hidden=16, activation="gelu", weight_decay=1e-2, epochs=100, batch_size=64,
                 learning_rate=0.05, damping=1e-3, dampings=(1e-4, 1e-3, 1e-2, 1e-1),
                 curvatures=("gauss_newton/block", "empirical_fisher/block", "gauss_newton/dense",
                             "empirical_fisher/dense"), tol=1e-10, maxiter=100, lbfgs_tol=1e-4, lbfgs_maxiter=20000,
                 **common),
    ))
    if quick:  # logreg only: a network's float64 polish to a tight ‖∇L‖ alone takes minutes on 2 CPU cores
        c.models = ("logreg",)
        c.draws, c.tune_draws = 2, 2
        c.epsilons = (0.3, 0.5, 0.7, 1.0, 1.5)
        c.logreg.curvatures = ("gauss_newton/dense", "empirical_fisher/dense")
        c.logreg.dampings = (0.0, 1e-3)
        c.cnn.update(dict(dampings=(1e-3, 1e-2), curvatures=("gauss_newton/block", "empirical_fisher/block")))
    return c


def _check(config: ml_collections.ConfigDict) -> None:
    for name in config.models:
        if name not in MODELS:
            raise errors.ConfigError(f"calibration.models: unknown model {name!r}; valid: {', '.join(MODELS)}.")
        for entry in config[name].curvatures:
            kind, _, structure = entry.partition("/")
            if kind not in curv_lib.KINDS or structure not in ("dense", "block") or entry == "hessian/block":
                raise errors.ConfigError(f"calibration.{name}.curvatures: {entry!r} is not '<kind>/<structure>' "
                                         f"with kind in {curv_lib.KINDS} and structure 'dense' or 'block' "
                                         "(the Hessian: 'dense' only).")
    if config.draws < 1 or config.tune_draws < 1:
        raise errors.ConfigError("calibration.draws and calibration.tune_draws must be at least 1.")
    if config.whole_class and config.draws + config.tune_draws > 10:
        raise errors.ConfigError(f"calibration: {config.draws} + {config.tune_draws} whole-class draws exceed the "
                                 "10 digit classes (tuning and evaluated classes must differ).")


# --------------------------------------------------------------------------------------------------
# The objective and its solver
# --------------------------------------------------------------------------------------------------


class Objective(NamedTuple):
    """Jitted full-batch functions of the ravelled parameters ``θ`` ``[P]`` and row weights ``w`` ``[n]`` (0/1),
    for ``L_w(θ) = Σ w_i ℓ_i / Σ w + (λ_wd/2)‖θ‖²``:

    * ``loss``, ``grad`` (``[P]``);
    * ``factor``: ``(θ, w, μ) ->`` the lower Cholesky factor ``[P, P]`` of the dense Gauss-Newton matrix
      ``G_w + μ I``, ``G_w = Σ w_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i / Σ w + λ_wd I``;
    * ``direction``: ``(θ, w, g, factor, μ, tol) -> ((∇²L_w(θ) + μ I)⁻¹ g, converged)`` by matrix-free CG to a
      relative residual ``tol`` on exact Hessian-vector products, preconditioned with ``factor`` (from any earlier
      point: it only speeds CG up);
    * ``logits``: ``(θ, x) -> [m, K]``.
    """

    loss: Callable
    grad: Callable
    factor: Callable
    direction: Callable
    logits: Callable


CG_MAXITER = 100
FACTOR_CHUNK = 32
MAX_SHIFTS = 20
MU_MIN = 1e-4  # the first Levenberg-Marquardt shift, mean units (the scale of λ_wd)


def objective(model, x: jax.Array, y: jax.Array, weight_decay: float, unravel: Callable) -> Objective:
    """The :class:`Objective` of ``model`` on rows ``(x, y)`` (call under x64 for float64)."""
    apply = lambda flat: model.apply({"params": unravel(flat)}, x)

    def loss(flat, w):
        ce = optax.softmax_cross_entropy_with_integer_labels(apply(flat), y)
        return jnp.sum(w * ce) / jnp.sum(w) + 0.5 * weight_decay * jnp.dot(flat, flat)

    dense = curv_lib.Layout("dense", 0, np.zeros((0, 0), np.int32))
    # Per-example Jacobians of a conv layer cost superlinearly in the batch on XLA CPU: accumulate over small chunks.
    pad = -len(y) % FACTOR_CHUNK
    xc = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(-1, FACTOR_CHUNK, *x.shape[1:])
    yc = jnp.concatenate([y, jnp.zeros(pad, y.dtype)]).reshape(-1, FACTOR_CHUNK)

    def factor(flat, w, mu):
        wc = jnp.concatenate([w, jnp.zeros(pad, w.dtype)]).reshape(-1, FACTOR_CHUNK)
        add = lambda acc, b: (acc + curv_lib.term_sum("gauss_newton", dense, model, unravel(flat), {}, *b), None)
        terms = jax.lax.scan(add, jnp.zeros((flat.shape[0],) * 2, flat.dtype), (xc, yc, wc))[0]
        return jnp.linalg.cholesky(terms / jnp.sum(w) + (weight_decay + mu) * jnp.eye(flat.shape[0], dtype=flat.dtype))

    def direction(flat, w, g, chol, mu, tol):
        matvec = lambda v: kernels.hvp(loss, flat, v, w) + mu * v
        precond = lambda r: jax.scipy.linalg.cho_solve((chol, True), r)
        d, info = kernels.cg_solve(matvec, g, precond=precond, tol=tol, maxiter=CG_MAXITER)
        return d, info.converged

    return Objective(jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(factor), jax.jit(direction),
                     jax.jit(lambda flat, xs: model.apply({"params": unravel(flat)}, xs)))


def minimise(obj: Objective, theta: np.ndarray, w: np.ndarray, *, tol: float, maxiter: int,
             factor: Any = None) -> tuple[np.ndarray, float, int, Any]:
    """Newton-CG with a Levenberg-Marquardt shift and backtracking on ``L_w`` from ``theta`` until
    ``‖∇L_w‖ ≤ tol`` or ``maxiter`` steps.

    Each direction solves ``(∇²L_w(θ) + μ I) d = ∇L_w(θ)`` inexactly (CG on exact Hessian-vector products to the
    relative residual ``min(1/2, √‖∇L_w‖)``, superlinear near a minimum; preconditioned by the Gauss-Newton
    ``factor``, refreshed at the current point when CG does not converge with it; a truncated CG direction is used
    as long as it descends). ``μ`` starts at 0 (plain Newton), grows when a full step fails the line search or the
    direction does not descend (the shifted Hessian is not positive definite there), and shrinks after full steps.
    A step is accepted on Armijo decrease, or, once the loss no longer resolves the decrease (its change is below
    float rounding), on a smaller gradient norm at an unchanged loss.

    Returns:
      ``(θ, ‖∇L_w(θ)‖, steps, factor)``.
    """
    theta = np.asarray(theta, np.float64)
    w = jnp.asarray(w, jnp.float64)
    f, g = float(obj.loss(theta, w)), np.asarray(obj.grad(theta, w))
    norm, steps, mu = float(np.linalg.norm(g)), 0, 0.0
    while norm > tol and steps < maxiter:
        stale, forcing = factor is not None, min(0.5, math.sqrt(norm))
        for _ in range(MAX_SHIFTS):
            if factor is None:
                factor, stale = obj.factor(theta, w, mu), False
            d, ok = obj.direction(theta, w, g, factor, mu, forcing)
            d = np.asarray(d)
            descends = bool(np.all(np.isfinite(d))) and float(g @ d) > 0
            if descends and (bool(ok) or not stale):
                break
            if stale:  # refresh the preconditioner first; with a fresh one, the shifted Hessian is not PD
                factor = None
            else:
                mu = max(4 * mu, MU_MIN)
        else:
            raise errors.CGNotConvergedError(f"calibration: no Newton direction with a shift up to μ = {mu:g}.")
        t, slope = 1.0, float(g @ d)
        while True:
            new = theta - t * d
            f_new, g_new = float(obj.loss(new, w)), np.asarray(obj.grad(new, w))
            n_new = float(np.linalg.norm(g_new))
            flat_loss = abs(f_new - f) <= 64 * np.finfo(np.float64).eps * abs(f)
            if f_new <= f - 1e-4 * t * slope or (flat_loss and n_new < norm) or t < 1e-8:
                break
            t *= 0.5
        if t < 1e-8 and n_new >= norm:  # no descent along an exact direction: stop at the rounding floor
            break
        mu = max(4 * mu, MU_MIN) if t < 1 else (mu / 4 if mu > MU_MIN else 0.0)
        theta, f, g, norm, steps = new, f_new, g_new, n_new, steps + 1
    return theta, norm, steps, factor


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


def requests(train_set: data_lib.Dataset, config: ml_collections.ConfigDict) -> dict[str, dict[str, list]]:
    """``{setting: {"evaluated": [ids...], "tuning": [ids...]}}`` for ``k=<k>`` and ``class`` (see the module
    docstring): tuning and evaluated ids of a setting never overlap."""
    ids, seed = np.asarray(train_set.ids), int(config.seed)
    tune_pool, eval_pool = data_lib.draw_disjoint(ids, 2, len(ids) // 2, seed=seed)
    out = {}
    for k in config.ks:
        try:
            evaluated = data_lib.draw_disjoint(eval_pool, config.draws, int(k), seed=seed + 1 + int(k))
            tuning = data_lib.draw_disjoint(tune_pool, config.tune_draws, int(k), seed=seed + 2 + int(k))
        except ValueError as e:
            raise errors.ConfigError(f"calibration: k = {k}: {e}") from e
        out[f"k={k}"] = {"evaluated": evaluated, "tuning": tuning}
    if config.whole_class:
        classes = np.random.default_rng(seed).permutation(train_set.num_classes)
        of = lambda c: np.sort(ids[train_set.y == c])
        out["class"] = {"evaluated": [of(c) for c in classes[:config.draws]],
                        "tuning": [of(c) for c in classes[config.draws:config.draws + config.tune_draws]]}
    return out


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def _model(name: str, sec: ml_collections.ConfigDict):
    if name == "logreg":
        return models.MLP(hidden=(), num_classes=10, input_mean=float(sec.input_mean), input_std=float(sec.input_std))
    return models.SmallCNN(channels=tuple(sec.channels), hidden=int(sec.hidden), num_classes=10,
                           activation=str(sec.activation))


def _stats(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _stepper(model, splits, variables, entry: str, sec, dampings) -> Callable[[np.ndarray], dict]:
    """``ids -> {λ_rel: Δ}``: the library's ε = 1 step ``θ̂ − θ*`` per damping (``None`` where ``C_r`` is not PD),
    from one method and one curvature build per entry (one set of compiled programs)."""
    kind, _, structure = entry.partition("/")
    cfg = method_lib.default_config()
    cfg.update(dict(curvature=kind, structure=structure, damping=1.0, epsilon=1.0, downdate="raise",
                    block_size=int(sec.block_size), max_dense_params=max(int(sec.max_dense_params), 1),
                    chunk=8 if kind == "hessian" else int(sec.chunk)))
    cfg.train.weight_decay = float(sec.weight_decay)  # the λ_wd of the step must be the training one
    method = method_lib.Ssse(model, splits, cfg, mesh=mesh_lib.make_mesh(1))
    unit = method.build_curvature(variables, np.arange(method.num_train))
    theta = np.asarray(ravel_pytree(variables["params"])[0])
    key = jax.random.key_data(jax.random.key(0))

    def steps(ids):
        out = {}
        for lam in dampings:
            curvature = unit.replace(damping=jnp.float32(lam * float(unit.damping)))
            state = method_lib.SsseState(variables, method.empty_ledger(), key, curvature)
            try:
                after, _ = method.forget(state, ids)
                out[lam] = np.asarray(ravel_pytree(after.variables["params"])[0]) - theta
            except errors.CurvatureError:
                out[lam] = None
        return out

    return steps


def _unrecovered(delta: np.ndarray | None, shift: np.ndarray, eps: float) -> float:
    return math.inf if delta is None else float(np.linalg.norm(eps * delta - shift) / np.linalg.norm(shift))


def _guo_bound(model, params_like, train_set, rows: np.ndarray, delta: np.ndarray) -> float:
    """Guo et al.'s data-dependent residual expression in sum form, ``(1/4)‖X_r‖₂ ‖ΔW‖ ‖X_r ΔW‖`` with ``X_r`` the
    retained features with a bias column and ``ΔW`` ``[D+1, K]`` (linear model only; γ = 1/4 is the binary
    logistic constant, so for softmax it is a scale, not a certificate)."""
    step = ravel_pytree(params_like)[1](jnp.asarray(delta))["head"]
    dw = np.concatenate([np.asarray(step["kernel"]), np.asarray(step["bias"])[None]], axis=0)
    x = (np.asarray(train_set.x[rows], np.float64).reshape(len(rows), -1) - model.input_mean) / model.input_std
    x = np.concatenate([x, np.ones((len(rows), 1))], axis=1)
    return float(0.25 * np.linalg.norm(x, 2) * np.linalg.norm(dw) * np.linalg.norm(x @ dw))


def _solve(obj: Objective, unravel, model, sec, splits, theta: np.ndarray, w: np.ndarray, factor=None) -> tuple:
    """``(θ, ‖∇L_w(θ)‖, Newton steps, L-BFGS iterations)``: the minimiser of ``L_w`` reached from ``theta``, by
    full-batch L-BFGS to ``lbfgs_tol`` (if ``lbfgs_maxiter > 0``: the global phase; Newton's region of fast
    convergence is small on a network) and then :func:`minimise` to ``tol``."""
    iterations = 0
    if int(sec.lbfgs_maxiter) > 0:
        out, info = train.train_full_batch(
            model, {"params": unravel(jnp.asarray(theta))}, splits.train.x, splits.train.y, rows=np.flatnonzero(w),
            weight_decay=float(sec.weight_decay), solver="lbfgs", tol=float(sec.lbfgs_tol),
            max_iter=int(sec.lbfgs_maxiter))
        theta, iterations = np.asarray(ravel_pytree(out["params"])[0]), info.iterations
    theta, norm, steps, _ = minimise(obj, theta, w, tol=float(sec.tol), maxiter=int(sec.maxiter), factor=factor)
    return theta, norm, steps, iterations


def _trained(name, model, sec, splits, seed: int) -> dict:
    """Initial (logreg) or recipe-trained float32 (cnn) variables, before the float64 polish."""
    variables = models.init_variables(model, jax.random.key(seed), splits.train.x.shape[1:])
    if name == "cnn":
        variables, _ = train.train_classifier(
            model, variables, splits.train.x, splits.train.y, epochs=int(sec.epochs), batch_size=int(sec.batch_size),
            learning_rate=float(sec.learning_rate), momentum=0.9, weight_decay=float(sec.weight_decay), seed=seed,
            desc="cnn recipe")
    return variables


def _study_model(name: str, config: ml_collections.ConfigDict, splits: data_lib.Splits) -> dict:
    sec, start = config[name], time.perf_counter()
    model = _model(name, sec)
    variables32 = _trained(name, model, sec, splits, int(config.seed))
    reqs = requests(splits.train, config)
    n, tol = len(splits.train.ids), float(sec.tol)
    # One host BLAS thread: OpenBLAS workers spinning between the many small LAPACK calls slow XLA (compat).
    with compat.enable_x64(), compat.host_blas_threads(1):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables32["params"])
        flat0, unravel = ravel_pytree(params)
        x_all, y_all = jnp.asarray(splits.train.x, jnp.float64), jnp.asarray(splits.train.y)
        obj = objective(model, x_all, y_all, float(sec.weight_decay), unravel)
        ones = np.ones(n)
        theta, norm, steps, lbfgs = _solve(obj, unravel, model, sec, splits, np.asarray(flat0), ones)
        variables = {"params": unravel(jnp.asarray(theta))}
        example = np.linalg.norm(np.asarray(curv_lib.rows("empirical_fisher", model, variables["params"], {}, x_all,
                                                          y_all))[:, 0], axis=1)
        x_test = jnp.asarray(splits.test.x, jnp.float64)
        test_logits = np.asarray(obj.logits(theta, x_test))
        out = {"num_params": int(theta.size), "num_train": n, "weight_decay": float(sec.weight_decay),
               "test_accuracy": evaluate.accuracy(test_logits, splits.test.y),
               "stationarity": {"grad_norm": norm, "mean_example_grad_norm": float(example.mean()), "tol": tol,
                                "newton_steps": steps, "lbfgs_iterations": lbfgs},
               "requests": {}, "curvatures": {}, "skipped": {}}
        # Gold standards: one per request (evaluated and tuning), each from θ* with the factor at θ*.
        gold, weights, factor = {}, {}, obj.factor(theta, jnp.asarray(ones), 0.0)
        for setting, both in progress.track(list(reqs.items()), desc=f"{name} gold standards"):
            rows = []
            for role in ("evaluated", "tuning"):
                for i, ids in enumerate(both[role]):
                    w = ones.copy()
                    w[np.searchsorted(splits.train.ids, ids)] = 0
                    g_theta, g_norm, g_steps, _ = _solve(obj, unravel, model, sec, splits, theta, w, factor)
                    gold[(setting, role, i)], weights[(setting, role, i)] = g_theta, w
                    rows.append({"role": role, "grad_norm": g_norm, "steps": g_steps,
                                 "shift": float(np.linalg.norm(g_theta - theta))})
            out["requests"][setting] = {
                "evaluated": [a.tolist() for a in both["evaluated"]], "tuning": [a.tolist() for a in both["tuning"]],
                "gold_grad_norm_max": max(r["grad_norm"] for r in rows),
                "gold_converged": all(r["grad_norm"] <= tol for r in rows),
                "shift": _stats([r["shift"] for r in rows if r["role"] == "evaluated"])}
        dampings = sorted(set(map(float, sec.dampings)) | {float(sec.damping)})
        entries = list(sec.curvatures)
        eta = progress.Eta(len(entries) * len(reqs), f"ssse calibration {name}")
        for entry in entries:
            if entry.endswith("/dense") and theta.size > int(sec.max_dense_params):
                out["skipped"][entry] = f"P = {theta.size} > max_dense_params = {sec.max_dense_params}"
                continue
            table = out["curvatures"][entry] = {}
            stepper = _stepper(model, splits, variables, entry, sec, dampings)
            for setting, both in reqs.items():
                steps = {role: [stepper(ids) for ids in both[role]] for role in ("tuning", "evaluated")}
                table[setting] = _setting(name, config, sec, model, splits, variables, obj, theta, entry, setting,
                                          both, steps, gold, weights, dampings, x_test, test_logits)
                u = table[setting]["unrecovered"]
                eta.step(f"{entry} {setting}: unrecovered at ε=1 {u['mean']:.3g}" if u else f"{entry} {setting}")
    out["seconds"] = time.perf_counter() - start
    return out


def _setting(name, config, sec, model, splits, variables, obj, theta, entry, setting, both, steps, gold, weights,
             dampings, x_test, test_logits) -> dict:
    """One row of the table: tuning on the tuning requests' steps, readouts on the evaluated ones."""
    shifts = {role: [gold[(setting, role, i)] - theta for i in range(len(both[role]))] for role in steps}
    grid = {(lam, eps): float(np.mean([_unrecovered(s[lam], sh, eps) for s, sh in
                                       zip(steps["tuning"], shifts["tuning"], strict=True)]))
            for lam in dampings for eps in map(float, config.epsilons)}
    lam_t, eps_t = min(grid, key=grid.get)
    ref, guo = float(sec.damping), name == "logreg" and not entry.startswith("empirical_fisher") and sec.damping == 0
    rec = {k: [] for k in ("u1", "ut", "uo", "eo", "r0", "r1", "rt", "guo", "guo_res")}
    out_space = {f"{where}_{which}": [] for where in ("test", "forget") for which in ("original", "epsilon_1", "tuned")}
    for i, ids in enumerate(both["evaluated"]):
        shift, w = shifts["evaluated"][i], weights[(setting, "evaluated", i)]
        d1, dt = steps["evaluated"][i][ref], steps["evaluated"][i][lam_t]
        residual = lambda point, w=w: float(np.linalg.norm(np.asarray(obj.grad(point, jnp.asarray(w)))))
        rec["u1"].append(_unrecovered(d1, shift, 1.0))
        rec["r0"].append(residual(theta))
        points = {"original": theta}
        if d1 is not None:
            rec["eo"].append(float(d1 @ shift / (d1 @ d1)))
            rec["uo"].append(_unrecovered(d1, shift, rec["eo"][-1]))
            points["epsilon_1"] = theta + d1
            rec["r1"].append(residual(points["epsilon_1"]))
            if guo:
                rec["guo"].append(_guo_bound(model, variables["params"], splits.train, np.flatnonzero(w), d1))
                rec["guo_res"].append(rec["r1"][-1] * float(w.sum()))
        if dt is not None and math.isfinite(grid[(lam_t, eps_t)]):  # else every pair failed on the tuning requests
            rec["ut"].append(_unrecovered(dt, shift, eps_t))
            points["tuned"] = theta + eps_t * dt
            rec["rt"].append(residual(points["tuned"]))
        x_forget = jnp.asarray(splits.train.x[np.searchsorted(splits.train.ids, ids)], jnp.float64)
        for where, xs in (("test", x_test), ("forget", x_forget)):
            reference = np.asarray(obj.logits(gold[(setting, "evaluated", i)], xs))
            for which, point in points.items():
                logits = test_logits if (which, where) == ("original", "test") else np.asarray(obj.logits(point, xs))
                out_space[f"{where}_{which}"].append(evaluate.activation_distance(logits, reference))
    row = {"unrecovered": _stats(rec["u1"]), "damping": ref, "failed": sum(u == math.inf for u in rec["u1"]),
           "tuned_epsilon": eps_t, "tuned_damping": lam_t,
           "tuning_unrecovered": grid[(lam_t, eps_t)] if math.isfinite(grid[(lam_t, eps_t)]) else None,
           "unrecovered_tuned": _stats(rec["ut"]), "oracle_epsilon": _stats(rec["eo"]),
           "unrecovered_oracle": _stats(rec["uo"]), "residual_grad_norm": _stats(rec["r1"]),
           "residual_grad_norm_tuned": _stats(rec["rt"]), "residual_grad_norm_original": _stats(rec["r0"]),
           "activation_distance": {k: _stats(v) for k, v in out_space.items()}}
    if rec["guo"]:  # the exact Newton step only (exact curvature, no damping)
        row["guo_bound_sum_form"], row["residual_sum_form"] = _stats(rec["guo"]), _stats(rec["guo_res"])
    return row


# --------------------------------------------------------------------------------------------------
# The study, its table and its plot
# --------------------------------------------------------------------------------------------------


def calibration(config: ml_collections.ConfigDict, *, workdir: str | None = None) -> dict:
    """The calibration study (module docstring); JSON-ready, and ``workdir/ssse_calibration.png`` when given.

    Returns:
      ``{"setup": {...}, "config": ..., "models": {model: {"stationarity", "requests": {setting: ids and gold
      standards}, "curvatures": {"<kind>/<structure>": {setting: row}}, ...}}, "markdown": str, "plots": [...]}``;
      a row holds ``unrecovered`` (ε = 1 at ``damping``), ``tuned_epsilon``, ``tuned_damping``,
      ``unrecovered_tuned``, ``oracle_epsilon``, ``unrecovered_oracle`` (each ``{mean, min, max}`` over the
      evaluated requests), the residual gradient norms and the activation distances to the gold standard.

    Raises:
      ConfigError: an unknown model or curvature, or draws that do not fit the data.
    """
    _check(config)
    splits = data_lib.make_splits(data_lib.load_digits(), test_fraction=0.2, seed=int(config.split_seed))
    result = {
        "setup": {
            "objective": "mean cross-entropy + (weight_decay/2)·‖θ‖² over the training rows, float64",
            "unrecovered": "‖θ̂ − θ_r*‖ / ‖θ* − θ_r*‖ (0: the gold standard, 1: not erasing)",
            "logreg": "multinomial logistic regression (MLP(hidden=())) on digits pixels / 16; gold standard: the "
                      "exact retrain (unique optimum): Newton from θ* on D_r to ‖∇L‖ ≤ tol",
            "cnn": "SmallCNN (GELU), classifier recipe in float32, then float64 full-batch L-BFGS and Newton-CG to "
                   "‖∇L‖ ≤ tol; gold standard: the retained objective's minimiser in θ*'s basin (the same solvers on "
                   "D_r warm-started from θ*), not an independent retrain (pitfall 11)",
            "tuning": "per setting, (ε, λ_rel) minimising the mean unrecovered fraction on tuning requests that share "
                      "no id with the evaluated ones; oracle ε: the best scalar on the evaluated request (reference)",
            "residual": "‖∇L_{D_r}(θ̂)‖ in mean form; residual_grad_norm_original: the same at θ* (not erasing)",
            "activation_distance": "mean L1 distance of softmax outputs to the gold standard on test / forget rows",
        },
        "config": config.to_dict(), "models": {}}
    for name in config.models:
        print(f"SSSE calibration: {name}", flush=True)
        result["models"][name] = _study_model(name, config, splits)
    result["markdown"] = markdown(result)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        result["plots"] = [plot(result, os.path.join(workdir, PLOT_NAME))]
    return result


def markdown(result: dict) -> str:
    """Markdown tables, one per model: mean (min–max) over the evaluated requests."""
    lines, _fmt = [], lambda s: "—" if s is None else f"{s['mean']:.3g} ({s['min']:.3g}–{s['max']:.3g})"
    for name, res in result["models"].items():
        st = res["stationarity"]
        lines += [f"**{name}** (P = {res['num_params']}, n = {res['num_train']}, λ_wd = {res['weight_decay']:g}, "
                  f"test accuracy {res['test_accuracy']:.3f}; ‖∇L_D(θ*)‖ = {st['grad_norm']:.2e}, mean ‖g_i‖ = "
                  f"{st['mean_example_grad_norm']:.2e})", "",
                  "| curvature | removed | ε = 1 | tuned (ε, λ_rel) on held-out | tuned | oracle ε | oracle "
                  "| ‖∇L_r(θ̂)‖ / ‖∇L_r(θ*)‖ | act. dist. test, θ̂ / θ* | act. dist. forget, θ̂ / θ* |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for entry, table in res["curvatures"].items():
            for setting, row in table.items():
                r1, r0 = row["residual_grad_norm"], row["residual_grad_norm_original"]
                ad = row["activation_distance"]
                ratio = f"{r1['mean'] / r0['mean']:.2g}" if r1 and r0 else "—"
                act = " | ".join(f"{ad[f'{w}_epsilon_1']['mean']:.2g} / {ad[f'{w}_original']['mean']:.2g}"
                                 if ad[f"{w}_epsilon_1"] else "—" for w in ("test", "forget"))
                lines.append(f"| {entry} | {setting} | {_fmt(row['unrecovered'])} | {row['tuned_epsilon']:g}, "
                             f"{row['tuned_damping']:g} | {_fmt(row['unrecovered_tuned'])} | "
                             f"{_fmt(row['oracle_epsilon'])} | {_fmt(row['unrecovered_oracle'])} | {ratio} | {act} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """Unrecovered fraction against the removal setting, one panel per model and one colour per curvature (ε = 1
    solid, the held-out-tuned pair dashed); returns ``path``."""
    names = list(result["models"])
    fig = report.figure(figsize=(6 * max(len(names), 1), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(names), 1)))
    for ax, name in zip(axes, names, strict=False):
        for i, (entry, table) in enumerate(result["models"][name]["curvatures"].items()):
            settings = list(table)
            for field, style in (("unrecovered", "o-"), ("unrecovered_tuned", "x--")):
                ys = [table[s][field]["mean"] if table[s][field] else np.nan for s in settings]
                ax.plot(settings, ys, style, color=f"C{i}", label=f"{entry} ({'ε=1' if style == 'o-' else 'tuned'})")
        ax.set_yscale("log")
        ax.set_xlabel("removed")
        ax.set_ylabel("‖θ̂ − θ_r*‖ / ‖θ* − θ_r*‖")
        ax.set_title(f"SSSE calibration: {name}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    report.save_figure(fig, path)
    return path


__all__ = ["Objective", "calibration", "default_config", "markdown", "minimise", "objective", "plot", "requests"]
