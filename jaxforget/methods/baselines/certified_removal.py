"""Certified removal (Guo, Goldstein, Hannun & van der Maaten, "Certified Data Removal from Machine Learning Models",
ICML 2020) on the method contract: the Newton removal step of an L2-regularised linear softmax classifier, with the
data-dependent residual bound and optional objective perturbation (:class:`CertifiedRemoval`)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from jaxforget import errors, kernels, models, train
from jaxforget.kernels import weighted_cross_entropy_sum as weighted_loss_sum
from jaxforget.methods import base
from jaxforget.methods.baselines.classifier import ClassifierMethod, ClassifierState

PyTree = Any




#: ``c`` in the residual bound ``β = c ‖X̃_r‖₂ max_i‖δ_i‖ ‖X̃_r ΔW‖_F`` of the multinomial logistic loss (see
#: :class:`CertifiedRemoval`): half the Lipschitz constant ``1/√2`` of the softmax Jacobian ``diag(p) − ppᵀ``.
BOUND_CONSTANT = 1.0 / (2.0 * math.sqrt(2.0))
#: ``fold_in`` tag of the objective perturbation's key (the recipe splits its key, so the streams never meet).
PERTURBATION_TAG = 0x6F626A70


def objective_perturbation(key: jax.Array, like: PyTree, sigma: float) -> PyTree:
    """Guo et al.'s ``b ~ N(0, σ² I)`` shaped like ``like`` (a pytree of arrays or shape-dtype structs), drawn from
    ``fold_in(key, PERTURBATION_TAG)``: the original and every retrain from the same key share it."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.fold_in(key, PERTURBATION_TAG), len(leaves))
    return treedef.unflatten([sigma * jax.random.normal(k, leaf.shape, leaf.dtype)
                              for k, leaf in zip(keys, leaves, strict=True)])


def curvature_sums(model: nn.Module, unravel, flat: jax.Array, x: jax.Array, y: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""``(Σ_b w_b ∇²ℓ_b, Σ_b w_b J_bᵀJ_b)``, both ``[P, P]`` in ravelled order, for one batch (eval mode).

    The Hessian column by column as Hessian-vector products (:func:`jaxforget.kernels.hvp`); the Gram of the logit
    Jacobians ``J_b = ∂f(x_b)/∂θ`` (:func:`jaxforget.kernels.per_example_jacobian`, ``[B, K, P]``). For a linear
    classifier ``J_b = I_K ⊗ x̃_bᵀ``, so the largest eigenvalue of the Gram is ``‖X̃‖₂²``.
    """
    eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
    loss = lambda f: weighted_loss_sum(model, {}, unravel(f), x, y, weights)
    hess = jax.vmap(lambda e: kernels.hvp(loss, flat, e))(eye)
    logits_one = lambda f, xi: model.apply({"params": unravel(f)}, xi[None], train=False)[0]
    jac = kernels.per_example_jacobian(logits_one, flat, x)
    gram = jnp.einsum("b,bkp,bkq->pq", weights.astype(jac.dtype), jac, jac)
    return hess, gram


def newton_removal_step(flat: jax.Array, erased_grad_sum: jax.Array, hess_sum: jax.Array, gram_sum: jax.Array,
                        k: jax.Array, n_r: jax.Array, weight_decay: jax.Array):
    r"""Guo et al.'s removal step in sum form, and the pieces of its residual bound.

    .. math::  w^- = w + H^{-1}\Delta, \qquad H = \sum_{D_r} \nabla^2 \ell_i(w) + \lambda_{wd}\, n_r I, \qquad
               \Delta = \sum_{S} \big(\nabla \ell_i(w) + \lambda_{wd}\, w\big) .

    Args:
      flat: ``[P]`` the current parameters ``w``.
      erased_grad_sum: ``[P]`` ``Σ_S ∇ℓ_i(w)``.
      hess_sum, gram_sum: ``[P, P]`` ``Σ_{D_r} ∇²ℓ_i(w)`` and ``Σ_{D_r} J_iᵀJ_i`` (:func:`curvature_sums`).
      k, n_r: the request's size and the retained count (scalars of ``flat``'s dtype).
      weight_decay: ``λ_wd``.

    Returns:
      ``(w⁻, Δw = H⁻¹Δ, ok, ‖Δ‖, ‖X̃_r‖₂)``; ``ok`` is False when ``H`` is not numerically positive definite.
    """
    delta = erased_grad_sum + k * weight_decay * flat
    eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
    hess = 0.5 * (hess_sum + hess_sum.T) + weight_decay * n_r * eye
    chol = jnp.linalg.cholesky(hess)
    step = jax.scipy.linalg.cho_solve((chol, True), delta)
    ok = jnp.all(jnp.isfinite(step))
    top = jnp.linalg.eigvalsh(0.5 * (gram_sum + gram_sum.T))[-1]
    return flat + step, step, ok, jnp.linalg.norm(delta), jnp.sqrt(jnp.maximum(top, 0))


def removal_step(params: PyTree, *args):
    """:func:`newton_removal_step` on a parameter pytree (ravelled and unravelled inside one program):
    ``(w⁻, Δw, ok, ‖Δ‖, ‖X̃_r‖₂, ‖Δw‖)``, ``w⁻`` and ``Δw`` like ``params``."""
    flat, unravel = ravel_pytree(params)
    new, step, ok, removed_norm, feature_norm = newton_removal_step(flat, *args)
    return unravel(new), unravel(step), ok, removed_norm, feature_norm, jnp.linalg.norm(step)


def logit_change_norms(model: nn.Module, step: PyTree, data) -> tuple[jax.Array, jax.Array]:
    """``(max_i ‖δ_i‖, ‖X̃ ΔW‖_F)`` over placed rows ``(x, y, w)`` (padding weighted 0), with ``δ_i = ΔWᵀx̃_i`` the
    logits of the step's parameters: a linear classifier is linear in its parameters, with no offset."""
    x, _, w = data
    norms = jnp.linalg.norm(model.apply({"params": step}, x, train=False), axis=1)
    norms = norms * w.astype(norms.dtype)
    return jnp.max(norms), jnp.linalg.norm(norms)


def sum_form_gradient_norm(grad_sum: jax.Array, b: jax.Array, params: PyTree, n: jax.Array,
                           weight_decay: jax.Array) -> jax.Array:
    """``‖Σ_i ∇ℓ_i(w) + b + λ_wd n w‖``: the gradient norm of the perturbed objective on ``n`` rows in sum form
    (``n`` times the mean form's)."""
    return jnp.linalg.norm(grad_sum + b + weight_decay * n * ravel_pytree(params)[0])


@struct.dataclass
class CertifiedRemovalState:
    """A linear classifier served by Newton removal.

    Attributes:
      variables: ``{"params": ...}`` of the published model.
      ledger: the deletion ledger.
      key: ``uint32[2]`` raw data of the key the original was trained with (its initialisation and its objective
        perturbation ``b``; the retrain reuses both).
      gradient_bound: ``float32[]`` the data-dependent residual-gradient bounds summed over the requests since the
        model was last trained exactly (0 for an original or a retrain).
    """

    variables: PyTree
    ledger: base.Ledger
    key: jax.Array
    gradient_bound: jax.Array


class CertifiedRemoval(ClassifierMethod):
    r"""Certified removal (Guo, Goldstein, Hannun & van der Maaten, "Certified Data Removal from Machine Learning
    Models", ICML 2020) for an L2-regularised multinomial logistic regression (``models.MLP`` with ``hidden=()``).

    **Training** (the recipe with a full-batch solver by default, ``train.solver = "newton"``) minimises

    .. math::  L_b(w; D) = \frac1n \sum_{i \in D} \ell_i(w) + \frac{\lambda_{wd}}{2} \lVert w\rVert^2
               + \frac1n b^\top w, \qquad b \sim N(0, \sigma^2 I),

    with ``b`` drawn from the state's key (:func:`objective_perturbation`; ``σ = sigma = 0`` by default: no
    perturbation), so the gold standard (the same recipe from the same key on ``D_r``) uses the same ``b``.

    **A request** ``S`` at the current weights ``w`` (retained set ``D_r`` after it, ``n_r`` samples) makes the
    Newton step of :func:`newton_removal_step` with the exact dense Hessian (``P ≤ max_params``). Multiplying the
    retained objective by ``n_r``, its gradient at a stationary ``w`` is
    :math:`\sum_{D_r}\nabla\ell_i + \lambda_{wd} n_r w + b = -\Delta` (``b`` cancels against the stationarity of
    ``L_b(·; D)``), so the step reads only ``S``'s gradients and ``D_r``'s Hessian. Requests are sequential: each
    recomputes both at the current weights on the shrinking ``D_r``.

    **The residual bound.** After the step the retained sum-form gradient is the Taylor remainder
    :math:`\sum_{D_r} \tilde x_i\, \rho_i^\top`, :math:`\rho_i = p(z_i + \delta_i) - p(z_i) - A(z_i)\delta_i`, with
    :math:`\delta_i = \Delta W^\top \tilde x_i` the change of sample ``i``'s logits, ``x̃_i`` its features (the
    normalised pixels and a 1 for the bias) and :math:`A = \mathrm{diag}(p) - pp^\top`. The third derivative of
    log-sum-exp along a unit ``u`` is the third central moment of ``u`` under ``p``, at most
    :math:`\mathrm{range}\cdot\mathrm{Var} \le \sqrt2 \cdot \tfrac12`, so :math:`\lVert\rho_i\rVert \le
    \lVert\delta_i\rVert^2 / (2\sqrt2)` and

    .. math::  \lVert \nabla L_{D_r}(w^-) \rVert \le \beta = \frac{1}{2\sqrt2}\, \lVert \tilde X_r \rVert_2\,
               \max_i \lVert \delta_i \rVert\, \lVert \tilde X_r \Delta W \rVert_F

    (:data:`BOUND_CONSTANT`). Guo et al.'s binary form :math:`\tfrac14 \lVert X\rVert_2 \lVert\Delta w\rVert
    \lVert X \Delta w\rVert` assumes ``‖x_i‖ ≤ 1`` (then :math:`|\delta_i| \le \lVert\Delta w\rVert`) and the
    constant ``1/4`` of the logistic loss; pixel features are not normalised here, and the multinomial constant is
    the one above. β bounds the Taylor remainder; a ``w`` that was not exactly stationary adds its own gradient,
    which :meth:`describe` reports (``stationarity``). ``ForgetInfo.notes`` report ``gradient_bound`` (β),
    ``gradient_bound_total`` (summed since the last exact training, held in the state), the measured
    ``gradient_residual`` ‖∇L_b(w⁻; D_r)‖ (sum form, the perturbation included), ``removed_gradient_norm`` ‖Δ‖,
    ``feature_norm`` ‖X̃_r‖₂ and ``step_norm`` ‖Δw‖. ``ForgetInfo.residual`` is β relative to the gradient the step
    removes, :math:`\beta / \lVert\Delta\rVert` (mixed-linear's relative gradient residual
    ``‖g_r(w)‖/‖g_r(w_old)‖`` with the bound in place of the measured numerator: the bound is what a certificate
    uses).

    **Certification.** Only with ``sigma > 0``: by Guo et al.'s Theorem 3, removal is :math:`(\epsilon, \delta)`-
    certified with :math:`\epsilon = \sqrt{2 \ln(1.5/\delta)}\, \beta_{total} / \sigma` (``δ = delta``), reported as
    ``notes["epsilon"]``; this presumes the training reached the exact optimum (``train.tol`` bounds what it
    missed, reported by :meth:`describe`). With ``sigma = 0`` nothing is certified and the notes say so.

    ``passes`` counts the two passes over ``D_r`` (curvature, then the residual); the dense Hessian is ``P``
    Hessian-vector products per sample.
    """

    name = "certified_removal"

    @classmethod
    def default_config(cls):
        config = super().default_config()
        config.train.solver = "newton"  # the step is the exact removal only from a stationary model
        config.update(dict(sigma=0.0, delta=1e-4, max_params=4096, chunk=32))
        return config

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        base.check_range(config.sigma, "method.sigma", low=0)
        base.check_range(config.delta, "method.delta", low=0, high=1, low_open=True)
        base.check_range(config.max_params, "method.max_params", low=1)
        base.check_range(config.chunk, "method.chunk", low=1)
        if config.sigma > 0 and config.train.solver == "sgd":
            raise errors.ConfigError("method.sigma > 0 perturbs the training objective, which only the full-batch "
                                     "solvers optimise: set method.train.solver to 'newton' or 'lbfgs'.")

    def __init__(self, model, splits, config, *, mesh=None):
        super().__init__(model, splits, config, mesh=mesh)
        if not isinstance(model, models.MLP) or tuple(model.hidden):
            raise errors.ConfigError(
                "method 'certified_removal' is the Newton removal step of a convex model: it needs a linear "
                f"classifier, model 'mlp' with hidden=(), got {type(model).__name__}"
                f"{f'(hidden={tuple(model.hidden)})' if isinstance(model, models.MLP) else ''}.")
        like = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), splits.train.x.shape[1:]))
        self.params_like = like["params"]
        self.num_params = int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(self.params_like)))
        if self.num_params > config.max_params:
            raise errors.ConfigError(
                f"method 'certified_removal' holds the dense {self.num_params} x {self.num_params} Hessian, over "
                f"method.max_params = {config.max_params}.")

    # ------------------------------------------------------------------ training

    def _linear_term(self, key):
        if self.config.sigma == 0:
            return None
        return self._jitted("objective_perturbation", lambda: functools.partial(
            objective_perturbation, like=self.params_like, sigma=float(self.config.sigma)))(key)

    def _wrap(self, state: ClassifierState) -> CertifiedRemovalState:
        return CertifiedRemovalState(state.variables, state.ledger, state.key, jnp.zeros((), jnp.float32))

    def init(self, key):
        return self._wrap(super().init(key))

    def retrain(self, state, key=None):
        return self._wrap(super().retrain(state, key))

    def init_population(self, keys):
        return [self._wrap(s) for s in super().init_population(keys)]

    def retrain_population(self, state, keys):
        return [self._wrap(s) for s in super().retrain_population(state, keys)]

    def abstract_state(self):
        return self._wrap(super().abstract_state())

    def retrain_key(self):
        key = super().retrain_key()
        if self.config.sigma > 0:  # the perturbation changes the optimum the retrain finds
            key["objective_perturbation_sigma"] = float(self.config.sigma)
        return key

    def perturbation(self, state) -> jax.Array:
        """``b`` of the state's key, ravelled ``[P]`` in the parameters' dtype (zeros without perturbation)."""
        like, sigma = self.params_like, float(self.config.sigma)

        def ravelled(key_data, params):
            flat = ravel_pytree(params)[0]
            if sigma == 0:
                return jnp.zeros_like(flat)
            b = objective_perturbation(jax.random.wrap_key_data(key_data), like, sigma)
            return ravel_pytree(b)[0].astype(flat.dtype)

        return self._jitted("perturbation", lambda: ravelled)(state.key, state.variables["params"])

    # ------------------------------------------------------------------ data passes

    def _grad_sum(self, params: PyTree, data) -> jax.Array:
        """``Σ ∇ℓ_i(θ)`` over placed rows, ravelled ``[P]``."""
        model = self.model
        fn = self._data_pass(
            "grad", lambda p, b: ravel_pytree(jax.grad(lambda q: weighted_loss_sum(model, {}, q, *b))(p))[0],
            int(self.config.chunk))
        return fn(params, data)

    def _curvature(self, params: PyTree, data) -> tuple[jax.Array, jax.Array]:
        """:func:`curvature_sums` over placed rows."""
        model = self.model

        def batch_fn(p, b):
            flat, unravel = ravel_pytree(p)  # in the parameters' own dtype (float64 under x64)
            return curvature_sums(model, unravel, flat, *b)

        return self._data_pass("curvature", batch_fn, int(self.config.chunk))(params, data)

    def stationarity(self, state) -> float:
        """``‖∇L_b(θ; D_r)‖`` of the mean-form training objective on the state's retained data (0 at the exact
        optimum; what the removal step assumes)."""
        rows, params = self.retained_positions(state), state.variables["params"]
        grads = self._grad_sum(params, self._place_rows(rows, int(self.config.chunk)))
        norm = self._jitted("gradient_norm", lambda: sum_form_gradient_norm)
        dtype = grads.dtype
        return float(norm(grads, self.perturbation(state), params, train.scalar(len(rows), dtype),
                          train.scalar(self.config.train.weight_decay, dtype))) / len(rows)

    def describe(self, state) -> dict:
        return {"num_params": self.num_params, "stationarity": self.stationarity(state),
                "sigma": float(self.config.sigma), "certified": bool(self.config.sigma > 0)}

    # ------------------------------------------------------------------ requests

    def unlearn(self, state, *, forget_rows, retain_rows, key):  # the classifier hook; this method overrides forget
        raise NotImplementedError("certified_removal serves requests through forget().")

    def forget(self, state: CertifiedRemovalState, ids, *, key: jax.Array | None = None
               ) -> tuple[CertifiedRemovalState, base.ForgetInfo]:
        """Removes ``ids`` by one Newton step (class docstring); ``key`` is unused (the randomness is ``b``, fixed
        at training).

        Raises:
          the request errors of :meth:`validate_request`; ForgetRequestError: the request would remove every
          remaining sample; NonFiniteError: NaN/Inf gradients or weights; DirectSolveError: a Hessian that is not
          numerically positive definite.
        """
        del key
        positions = self.validate_request(state, ids)
        new_ledger = state.ledger.record(positions)
        retained = np.flatnonzero(new_ledger.retain_mask())
        request = int(new_ledger.num_requests)
        if retained.size == 0:
            raise errors.ForgetRequestError(
                f"The request would remove all {len(positions)} remaining samples: there is no retained objective to "
                "step towards (retrain from scratch instead).")
        cfg, chunk = self.config, int(self.config.chunk)
        start = time.perf_counter()
        params = state.variables["params"]
        retained_data = self._place_rows(retained, chunk)
        erased = self._grad_sum(params, self._place_rows(positions, chunk))
        errors.check_finite(erased, f"gradients of the {len(positions)} removed samples")
        hess, gram = self._curvature(params, retained_data)
        dtype = erased.dtype
        n_r, wd = train.scalar(len(retained), dtype), train.scalar(cfg.train.weight_decay, dtype)
        new_params, step, ok, removed_norm, feature_norm, step_norm = self._jitted("step", lambda: removal_step)(
            params, erased, hess, gram, train.scalar(len(positions), dtype), n_r, wd)
        if not bool(ok):
            raise errors.DirectSolveError(
                f"certified_removal request {request}: the retained Hessian plus λ_wd·n_r·I is not numerically "
                f"positive definite (method.train.weight_decay = {cfg.train.weight_decay:g}).")
        errors.check_finite(new_params, f"weights after certified_removal request {request}")
        largest, frobenius = self._jitted(
            "logit_change", lambda: functools.partial(logit_change_norms, self.model))(step, retained_data)
        bound = BOUND_CONSTANT * float(feature_norm) * float(largest) * float(frobenius)
        gradient_residual = float(self._jitted("gradient_norm", lambda: sum_form_gradient_norm)(
            self._grad_sum(new_params, retained_data), self.perturbation(state), new_params, n_r, wd))
        seconds = time.perf_counter() - start
        total, removed = float(state.gradient_bound) + bound, float(removed_norm)
        notes = {"gradient_bound": bound, "gradient_bound_total": total, "gradient_residual": gradient_residual,
                 "removed_gradient_norm": removed, "bound_constant": BOUND_CONSTANT,
                 "feature_norm": float(feature_norm), "step_norm": float(step_norm), "sigma": float(cfg.sigma),
                 "certified": bool(cfg.sigma > 0)}
        if cfg.sigma > 0:  # Guo et al., Theorem 3: δ = 1.5 exp(−c²/2), σ = c β_total / ε
            notes.update(delta=float(cfg.delta),
                         epsilon=math.sqrt(2 * math.log(1.5 / cfg.delta)) * total / float(cfg.sigma))
        new_state = CertifiedRemovalState({**state.variables, "params": new_params}, new_ledger, state.key,
                                          jax.device_put(np.float32(total)))
        return new_state, base.ForgetInfo(
            request=request, num_forgotten=len(positions), num_retained=len(retained), seconds=seconds, passes=2.0,
            solver="newton-removal", iterations=1, residual=bound / removed if removed > 0 else 0.0, notes=notes)
