"""Training loops for classifiers: originals, retrains, core networks, fine-tuning baselines, populations.

One optimiser serves every recipe: SGD with heavy-ball momentum, coupled L2 (``optax.add_decayed_weights``, so the
fixed point is the minimiser of the regularised loss) and a cosine learning rate, built with
``optax.inject_hyperparams`` so that learning rate, momentum and weight decay are traced values. One compiled epoch
then serves every recipe, every request and every population member.

A recipe is a sequence of :class:`Plan` s, one per epoch: the epoch's batches as row indices into the *full*
training arrays, a per-example loss weight and a per-step ``active`` flag. Retraining on the retained rows
``D_r`` draws its batches from those rows only and leaves the remaining steps inactive, so shapes never change
between requests (nothing recompiles), and the result equals training on the physically reduced data with the
same seed. The batch order comes from ``(seed, epoch)`` alone, so a resumed run replays exactly.

The weighted loss of a step is :math:`\\sum_b w_b \\ell_b / \\sum_b |w_b|` with per-example cross-entropy
:math:`\\ell_b`: unit weights give the batch mean; negative weights ascend (NegGrad); weights ``α/B_r`` on a
retain batch and ``−(1−α)/B_f`` on a forget batch give ``α·CE_r − (1−α)·CE_f`` (NegGrad+).

:func:`train_full_batch` minimises the same regularised objective (mean cross-entropy plus ``(λ/2)‖θ‖²``) by a
full-batch Newton or L-BFGS solver to a gradient tolerance: the stationary model a convex removal step assumes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxforget import data as data_lib
from jaxforget import errors, progress
from jaxforget import mesh as mesh_lib

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    r"""Weighted softmax cross-entropy :math:`\sum_b w_b (-\log p_{y_b}(x_b)) / \sum_b |w_b|` (the mean without
    weights).

    Args:
      logits: ``[B, K]``.
      labels: ``[B]`` integer classes.
      weights: optional ``[B]`` example weights (0 for padding, negative to ascend).

    Examples:
      >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
      1.3863
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return losses.mean()
    weights = weights.astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(jnp.abs(weights)), jnp.finfo(losses.dtype).tiny)


def cosine_lr(learning_rate: jax.typing.ArrayLike, step: jax.typing.ArrayLike, total_steps: jax.typing.ArrayLike):
    r"""The one learning-rate schedule: :math:`\eta_t = \eta_0 \cdot \tfrac12 (1 + \cos(\pi \min(t/T, 1)))`.

    Every argument may be traced (one compiled loop serves every recipe); the step is cast explicitly, so the
    schedule works under strict dtype promotion.

    Examples:
      >>> round(float(cosine_lr(1.0, jnp.int32(5), 10.0)), 6)
      0.5
    """
    learning_rate = jnp.asarray(learning_rate, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step).astype(jnp.float32) / jnp.asarray(total_steps, jnp.float32), 1.0)
    return learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def _sgd(learning_rate, momentum, weight_decay) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


#: SGD + momentum + coupled L2 with every hyperparameter in the optimiser state (``opt_state.hyperparams``).
OPTIMIZER = optax.inject_hyperparams(_sgd)(learning_rate=0.0, momentum=0.0, weight_decay=0.0)


@jax.jit
def _init_optimizer(params: PyTree, momentum: jax.Array, weight_decay: jax.Array) -> PyTree:
    state = OPTIMIZER.init(params)
    return state._replace(hyperparams={**state.hyperparams, "momentum": momentum, "weight_decay": weight_decay})


def init_optimizer(params: PyTree, *, momentum: float, weight_decay: float = 0.0) -> PyTree:
    """The :data:`OPTIMIZER` state for ``params`` with the given momentum and coupled L2 coefficient.

    Momentum 0 is plain SGD: the trace ``g + 0·t`` equals ``g`` exactly. Jitted, with the hyperparameters moved
    explicitly: requests run under a host-to-device transfer guard.
    """
    return _init_optimizer(params, scalar(momentum, np.float32), scalar(weight_decay, np.float32))


def scalar(value, dtype) -> jax.Array:
    """A device scalar from a host number, moved explicitly (``jax.device_put``)."""
    return jax.device_put(np.asarray(value, dtype))


def sgd_update(grads: PyTree, params: PyTree, opt_state: PyTree, learning_rate: jax.Array) -> tuple[PyTree, PyTree]:
    """One :data:`OPTIMIZER` step at ``learning_rate`` (traced): ``(new params, new state)``."""
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def select(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``active`` (a traced bool scalar), else ``old``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)


# --------------------------------------------------------------------------------------------------
# Plans: an epoch's batches over chosen rows, with fixed shapes
# --------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """One epoch of batches over rows of the full training arrays.

    Attributes:
      indices: ``int32 [steps, batch]`` row indices into ``x`` / ``y``.
      weights: ``float32 [steps, batch]`` per-example loss weights (see the module docstring).
      active: ``bool [steps]``; an inactive step changes nothing (no update, no momentum, no step count).
    """

    indices: np.ndarray
    weights: np.ndarray
    active: np.ndarray


def epoch_plan(rows, batch_size: int, *, seed: int, epoch: int, num_steps: int | None = None,
               weight: float = 1.0) -> Plan:
    """The batches of one epoch over ``rows`` (positions into the full arrays), drop-last, padded to ``num_steps``.

    The order is ``data.batch_indices(len(rows), batch_size, seed, epoch)`` mapped through ``rows``: exactly the
    batches of training on the subset ``x[rows]`` with the same seed.

    Args:
      rows: ``[m]`` int positions of the rows to train on.
      batch_size: rows per step (at most ``m``; the last partial batch is dropped).
      seed, epoch: the order's seed (as :func:`jaxforget.data.batch_indices`).
      num_steps: pad with inactive steps to this many (default: ``m // batch_size``, no padding).
      weight: every example's loss weight.

    Examples:
      >>> p = epoch_plan(np.array([10, 11, 12, 13, 14]), 2, seed=0, epoch=0, num_steps=3)
      >>> p.indices.shape, p.active.tolist()
      ((3, 2), [True, True, False])
    """
    rows = np.asarray(rows, np.int64)
    batches = data_lib.batch_indices(len(rows), batch_size, seed=seed, epoch=epoch, drop_last=True)
    steps = len(batches) if num_steps is None else int(num_steps)
    if steps < len(batches):
        raise ValueError(f"epoch_plan: {len(batches)} batches do not fit in num_steps={steps}.")
    indices = np.zeros((steps, batch_size), np.int32)
    weights = np.zeros((steps, batch_size), np.float32)
    active = np.zeros(steps, bool)
    for i, b in enumerate(batches):
        indices[i], weights[i], active[i] = rows[b], weight, True
    return Plan(indices, weights, active)


def join_plans(*plans: Plan) -> Plan:
    """Steps of several plans side by side (a batch of each in every step); a step is active if all parts are.

    Examples:
      >>> a = epoch_plan(np.arange(4), 2, seed=0, epoch=0); b = epoch_plan(np.arange(4, 6), 1, seed=0, epoch=0)
      >>> join_plans(a, b).indices.shape
      (2, 3)
    """
    steps = {p.indices.shape[0] for p in plans}
    if len(steps) != 1:
        raise ValueError(f"join_plans: the plans have different step counts {sorted(steps)}.")
    return Plan(np.concatenate([p.indices for p in plans], axis=1), np.concatenate([p.weights for p in plans], axis=1),
                np.logical_and.reduce([p.active for p in plans]))


# --------------------------------------------------------------------------------------------------
# The classifier epoch
# --------------------------------------------------------------------------------------------------


def _classifier_epoch(model: nn.Module):
    def step(carry, plan_step, x, y, lr0, total):
        variables, opt_state, count = carry
        idx, w, active = plan_step
        xb, yb = x[idx], y[idx]
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(p):
            if rest:
                logits, updates = model.apply({"params": p, **rest}, xb, train=True, mutable=list(rest))
            else:
                logits, updates = model.apply({"params": p}, xb, train=True), {}
            return cross_entropy(logits, yb, w), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params, new_opt = sgd_update(grads, params, opt_state, cosine_lr(lr0, count, total))
        new = ({"params": new_params, **rest, **updates}, new_opt)
        variables, opt_state = select(active, new, (variables, opt_state))
        return (variables, opt_state, count + active.astype(count.dtype)), loss

    def epoch(variables, opt_state, count, x, y, plan, lr0, total):
        (variables, opt_state, count), losses = jax.lax.scan(
            lambda c, s: step(c, s, x, y, lr0, total), (variables, opt_state, count), plan)
        active = plan[2].astype(losses.dtype)
        return variables, opt_state, count, jnp.sum(losses * active) / jnp.maximum(jnp.sum(active), 1.0)

    return epoch


@functools.cache
def _epoch_fn(model: nn.Module):
    return jax.jit(_classifier_epoch(model))


@functools.cache
def _population_epoch_fn(model: nn.Module):
    # Models, optimiser states, step counts and plans are stacked on axis 0; data and hyperparameters are shared.
    return jax.jit(jax.vmap(_classifier_epoch(model), in_axes=(0, 0, 0, None, None, 0, None, None)))


def _device_plan(plan: Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(jax.device_put(np.asarray(a)) for a in plan)


def fit(
    model: nn.Module,
    variables: PyTree,
    x,
    y,
    plans: Callable[[int], Plan],
    *,
    epochs: int,
    total_steps: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    desc: str = "train",
) -> tuple[PyTree, list[float]]:
    """Trains a classifier for ``epochs`` epochs of ``plans(epoch)`` with the cosine schedule over ``total_steps``.

    Args:
      model: a flax module called as ``model.apply(variables, x, train=...)``.
      variables: initial ``{"params": ..., ["batch_stats": ...]}``.
      x: ``[n, H, W, C]`` float images in [0, 1] (host or device); plans index its rows.
      y: ``[n]`` int labels (a relabelled copy for label-changing recipes).
      plans: ``epoch -> Plan``; every plan must have the same shapes (one compilation).
      epochs: number of epochs.
      total_steps: active steps the cosine schedule spans.
      learning_rate, momentum, weight_decay: the optimiser's hyperparameters.
      desc: progress-bar label.

    Returns:
      ``(variables, losses)``: the trained variables and the per-epoch mean loss of the active steps.
    """
    opt_state = init_optimizer(variables["params"], momentum=momentum, weight_decay=weight_decay)
    epoch_fn = _epoch_fn(model)
    x_dev, y_dev = jax.device_put(np.asarray(x)), jax.device_put(np.asarray(y, np.int32))
    lr0, total = scalar(learning_rate, np.float32), scalar(max(total_steps, 1), np.float32)
    count, losses = scalar(0, np.int32), []
    for epoch in progress.track(range(epochs), desc=desc):
        variables, opt_state, count, loss = epoch_fn(variables, opt_state, count, x_dev, y_dev,
                                                     _device_plan(plans(epoch)), lr0, total)
        losses.append(float(loss))
    return variables, losses


def train_classifier(
    model: nn.Module,
    variables: PyTree,
    x,
    y,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    rows=None,
    desc: str = "train",
) -> tuple[PyTree, list[float]]:
    """Trains a classifier with cross-entropy on ``rows`` of ``(x, y)`` (all rows by default).

    Every epoch is ``len(rows) // batch_size`` steps (the last partial batch is dropped), padded with inactive
    steps to ``len(x) // batch_size``, so that any subset of the same arrays runs the same compiled epoch.

    Args:
      model: a flax module called as ``model.apply(variables, x, train=...)``.
      variables: initial ``{"params": ..., ["batch_stats": ...]}``.
      x: ``[n, H, W, C]`` float images in [0, 1].
      y: ``[n]`` int labels.
      epochs: passes over the rows.
      batch_size: minibatch size (at most the number of rows).
      learning_rate: initial learning rate of the cosine schedule.
      momentum: SGD momentum (0 for plain SGD).
      weight_decay: coupled L2 coefficient.
      seed: data-order seed.
      rows: ``[m]`` positions to train on (``None``: every row).
      desc: progress-bar label.

    Returns:
      ``(variables, losses)``.
    """
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.int64)
    batch_size = min(int(batch_size), len(rows))
    num_steps = max(len(x) // batch_size, 1)
    return fit(model, variables, x, y, lambda e: epoch_plan(rows, batch_size, seed=seed, epoch=e, num_steps=num_steps),
               epochs=epochs, total_steps=epochs * (len(rows) // batch_size), learning_rate=learning_rate,
               momentum=momentum, weight_decay=weight_decay, desc=desc)


def train_classifiers(
    model: nn.Module,
    variables: PyTree,
    x,
    y,
    *,
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    rows=None,
    desc: str = "train population",
) -> tuple[PyTree, np.ndarray]:
    """Trains a population of classifiers in parallel: one ``vmap``-ped epoch program for all of them.

    Model ``i`` starts from ``variables[i]`` (every leaf has a leading ``[M]`` axis) and sees the batch order
    of ``seeds[i]``, so it equals ``train_classifier(..., seed=seeds[i])`` on the unstacked variables up to
    float reassociation. Used for the populations of the distributional scores.

    Args:
      model, x, y, epochs, batch_size, learning_rate, momentum, weight_decay, rows: as :func:`train_classifier`.
      variables: stacked initial variables, leading axis ``M``.
      seeds: ``M`` data-order seeds.

    Returns:
      ``(variables, losses)``: stacked trained variables and the ``[M, epochs]`` per-epoch mean losses.

    Examples:
      >>> from jaxforget import models
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> v = jax.vmap(lambda k: models.init_variables(model, k, (4,)))(jax.random.split(jax.random.key(0), 2))
      >>> x, y = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), np.arange(8) % 3
      >>> out, losses = train_classifiers(model, v, x, y, seeds=[0, 1], epochs=2, batch_size=4,
      ...                                 learning_rate=0.1)
      >>> losses.shape
      (2, 2)
    """
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.int64)
    batch_size = min(int(batch_size), len(rows))
    num_steps = max(len(x) // batch_size, 1)
    opt_state = jax.vmap(lambda p: init_optimizer(p, momentum=momentum, weight_decay=weight_decay))(
        variables["params"])
    epoch_fn = _population_epoch_fn(model)
    x_dev, y_dev = jax.device_put(np.asarray(x)), jax.device_put(np.asarray(y, np.int32))
    lr0, total = scalar(learning_rate, np.float32), scalar(max(epochs * (len(rows) // batch_size), 1), np.float32)
    count = jax.device_put(np.zeros(len(seeds), np.int32))
    losses = []
    for epoch in progress.track(range(epochs), desc=desc):
        plans = [epoch_plan(rows, batch_size, seed=int(s), epoch=epoch, num_steps=num_steps) for s in seeds]
        stacked = Plan(*(np.stack(parts) for parts in zip(*plans, strict=True)))
        variables, opt_state, count, loss = epoch_fn(variables, opt_state, count, x_dev, y_dev,
                                                     _device_plan(stacked), lr0, total)
        losses.append(np.asarray(loss))
    return variables, np.stack(losses, axis=1) if losses else np.zeros((len(seeds), 0))


# --------------------------------------------------------------------------------------------------
# Full-batch solvers: the same regularised objective, optimised to a gradient tolerance
# --------------------------------------------------------------------------------------------------

#: The full-batch solvers of :func:`train_full_batch` (``"sgd"`` is the minibatch recipe above).
FULL_BATCH_SOLVERS = ("newton", "lbfgs")
HIGHEST = jax.lax.Precision.HIGHEST


class FullBatchInfo(NamedTuple):
    """Diagnostics of :func:`train_full_batch` (host values).

    Attributes:
      iterations: Newton or L-BFGS iterations made.
      grad_norm: ``‖∇L(θ)‖`` of the mean-form objective at the returned parameters.
      converged: whether ``grad_norm ≤ tol``.
    """

    iterations: int
    grad_norm: float
    converged: bool


def _full_batch_sums(model: nn.Module, unravel, order: int):
    """``batch_fn`` for :func:`jaxforget.mesh.data_parallel_sum`: the weighted cross-entropy sum ``Σ_b w_b ℓ_b`` of
    a batch (eval mode) at ravelled parameters, with its gradient (``order ≥ 1``) and Hessian (``order = 2``)."""

    def loss_sum(flat, x, y, w):
        logits = model.apply({"params": unravel(flat)}, x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(w.astype(losses.dtype) * losses)

    def batch_fn(flat, batch):
        x, y, w = batch
        if order == 0:
            return loss_sum(flat, x, y, w)
        value, grad = jax.value_and_grad(loss_sum)(flat, x, y, w)
        if order == 1:
            return value, grad
        return value, grad, jax.hessian(loss_sum)(flat, x, y, w)

    return batch_fn


@functools.cache
def _full_batch_fn(model: nn.Module, solver: str, mesh, chunk: int):
    """The jitted solver ``(params, data, count, weight_decay, linear, tol, max_iter) -> (params, info)`` for
    one model, solver and mesh (shapes and dtypes retrace as usual)."""

    def solve(params, data, count, weight_decay, linear, tol, max_iter):
        flat0, unravel = ravel_pytree(params)
        dtype = flat0.dtype
        sums = [mesh_lib.data_parallel_sum(_full_batch_sums(model, unravel, order), mesh, chunk)
                for order in range(3)]
        count, weight_decay = count.astype(dtype), weight_decay.astype(dtype)
        linear, tol = linear.astype(dtype), tol.astype(dtype)
        eye = jnp.eye(flat0.shape[0], dtype=dtype)

        # L(θ) = (Σ_b w_b ℓ_b(θ) + bᵀθ) / m + (λ/2)‖θ‖², with m = Σ_b w_b (the rows trained on), from the sums.
        def value(flat, loss_sum=None):
            loss_sum = sums[0](flat, data) if loss_sum is None else loss_sum
            return (loss_sum + jnp.vdot(linear, flat, precision=HIGHEST)) / count \
                + 0.5 * weight_decay * jnp.vdot(flat, flat, precision=HIGHEST)

        def value_and_grad(flat):
            loss_sum, grad_sum = sums[1](flat, data)
            return value(flat, loss_sum), (grad_sum + linear) / count + weight_decay * flat

        def value_grad_hess(flat):
            loss_sum, grad_sum, hess_sum = sums[2](flat, data)
            hess = 0.5 * (hess_sum + hess_sum.T) / count + weight_decay * eye
            return value(flat, loss_sum), (grad_sum + linear) / count + weight_decay * flat, hess

        if solver == "newton":
            flat, grad, iterations = _newton(value, value_and_grad, value_grad_hess, flat0, tol, max_iter)
        else:
            flat, grad, iterations = _lbfgs(value, value_and_grad, flat0, tol, max_iter)
        grad_norm = jnp.linalg.norm(grad)
        return unravel(flat), (iterations, grad_norm, grad_norm <= tol)

    return jax.jit(solve)


def _newton(value, value_and_grad, value_grad_hess, flat0, tol, max_iter):
    r"""Newton's method with Armijo backtracking: :math:`d = -\nabla^2 L^{-1} \nabla L` by Cholesky (steepest
    descent where the Hessian is not positive definite: a non-convex model), step :math:`t = 2^{-j}`, the first
    that decreases ``L`` by at least :math:`10^{-4} t\, \nabla L^\top d` (with a rounding allowance, so that the
    full step near the optimum is not refused for a decrease below the objective's float resolution)."""
    eps = jnp.asarray(jnp.finfo(flat0.dtype).eps, flat0.dtype)

    def cond(carry):
        _, grad, it = carry
        return (jnp.linalg.norm(grad) > tol) & (it < max_iter)

    def body(carry):
        flat, _, it = carry
        f0, g, hess = value_grad_hess(flat)
        d = -jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(hess), True), g)
        d = jnp.where(jnp.all(jnp.isfinite(d)), d, -g)
        slope = jnp.vdot(g, d, precision=HIGHEST)
        slack = 16 * eps * (jnp.abs(f0) + 1)

        def refused(state):
            t, j = state
            return (value(flat + t * d) > f0 + 1e-4 * t * slope + slack) & (j < 60)

        t, _ = jax.lax.while_loop(refused, lambda s: (0.5 * s[0], s[1] + 1), (jnp.ones((), flat.dtype), 0))
        new = flat + t * d
        return new, value_and_grad(new)[1], it + 1

    _, grad0 = value_and_grad(flat0)
    return jax.lax.while_loop(cond, body, (flat0, grad0, jnp.zeros((), jnp.int32)))


def _lbfgs(value, value_and_grad, flat0, tol, max_iter):
    """``optax.lbfgs`` (zoom line search) until ``‖∇L‖ ≤ tol`` or ``max_iter`` iterations."""
    opt = optax.lbfgs()

    def cond(carry):
        _, _, grad, it = carry
        return (jnp.linalg.norm(grad) > tol) & (it < max_iter)

    def body(carry):
        flat, state, grad, it = carry
        v = optax.tree.get(state, "value")
        # optax's L-BFGS adds its int32 memory index to a default-int range, which strict promotion refuses under
        # float64 (jax_enable_x64); the standard rules give the same int32 index.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grad, state, flat, value=v, grad=grad, value_fn=value)
        flat = optax.apply_updates(flat, updates)
        # The line search evaluated the objective and its gradient at the accepted point: reuse them.
        grad = optax.tree.get(state, "grad")
        return flat, state, grad, it + 1

    state = opt.init(flat0)
    v0, g0 = value_and_grad(flat0)
    state = optax.tree.set(state, value=v0, grad=g0)
    flat, _, grad, it = jax.lax.while_loop(cond, body, (flat0, state, g0, jnp.zeros((), jnp.int32)))
    return flat, grad, it


def train_full_batch(
    model: nn.Module,
    variables: PyTree,
    x,
    y,
    *,
    weight_decay: float,
    solver: str = "newton",
    tol: float = 1e-6,
    max_iter: int = 100,
    rows=None,
    linear: PyTree | None = None,
    mesh: jax.sharding.Mesh | None = None,
    chunk: int = 256,
) -> tuple[PyTree, FullBatchInfo]:
    r"""Minimises the recipe's objective on ``rows`` by a full-batch solver, to a gradient tolerance.

    .. math::  L(\theta) = \frac{1}{m} \sum_{i \in \text{rows}} \ell_i(\theta)
               + \frac{\lambda}{2} \lVert\theta\rVert^2 + \frac{1}{m}\, b^\top \theta,

    ``ℓ_i`` the softmax cross-entropy in eval mode, ``m = |rows|``, ``λ = weight_decay`` over every parameter (the
    coupled L2 of the SGD recipe, whose fixed point minimises the same objective) and ``b = linear`` (Guo et al.'s
    objective perturbation; 0 by default). Stops once :math:`\lVert\nabla L(\theta)\rVert \le` ``tol``.

    * ``newton``: damped Newton with the dense Hessian (``P × P``, accumulated in ``chunk``-row batches): a few
      iterations to machine precision on a convex model (a linear classifier); meant for small ``P``.
    * ``lbfgs``: ``optax.lbfgs`` with its zoom line search: no ``P × P`` matrix.

    Sums over the rows go through :func:`jaxforget.mesh.data_parallel_sum` (every row of ``x`` is placed once,
    the rows not trained on with weight 0, so any subset of the same arrays runs the same compiled program). The
    parameters keep their dtype (float64 variables under ``jax.enable_x64`` give a float64 solve).

    Args:
      model: a flax module without train-mode state (no ``batch_stats``: eval mode would never update them).
      variables: initial ``{"params": ...}``.
      x: ``[n, H, W, C]`` float images; y: ``[n]`` int labels.
      weight_decay: ``λ ≥ 0``.
      solver: ``"newton"`` or ``"lbfgs"``.
      tol: gradient-norm tolerance of the mean-form objective.
      max_iter: iteration budget.
      rows: positions to train on (``None``: every row).
      linear: ``b``, a pytree like the parameters (``None``: no perturbation).
      mesh: the data-parallel mesh (one device by default).
      chunk: rows per device per step of a pass.

    Returns:
      ``(variables, info)`` with ``info`` a :class:`FullBatchInfo` (not converged is reported, not raised).

    Examples:
      >>> from jaxforget import models
      >>> model = models.MLP(hidden=(), num_classes=3)
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.uniform(size=(30, 2, 2, 1)).astype(np.float32), np.arange(30) % 3
      >>> v = models.init_variables(model, jax.random.key(0), (2, 2, 1))
      >>> _, info = train_full_batch(model, v, x, y, weight_decay=1e-2, tol=1e-5)
      >>> info.converged
      True
    """
    if solver not in FULL_BATCH_SOLVERS:
        raise errors.ConfigError(f"solver must be one of {list(FULL_BATCH_SOLVERS)}, got {solver!r}.")
    extra = sorted(k for k in variables if k != "params")
    if extra:
        raise errors.ConfigError(f"The full-batch solvers optimise the eval-mode objective of the parameters only; "
                                 f"the model also has {extra}, which they would never update: use solver 'sgd'.")
    mesh = mesh_lib.make_mesh(1) if mesh is None else mesh
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.int64)
    weights = np.zeros(len(x), np.float32)
    weights[rows] = 1.0
    data = mesh_lib.shard_rows((np.asarray(x), np.asarray(y, np.int32), weights), mesh, chunk)
    params = variables["params"]
    flat, _ = ravel_pytree(params)
    dtype = np.dtype(flat.dtype)
    linear_flat = (jax.device_put(np.zeros(flat.shape, dtype)) if linear is None
                   else ravel_pytree(linear)[0].astype(dtype))
    with jax.default_matmul_precision("highest"):
        params, (iterations, grad_norm, converged) = _full_batch_fn(model, solver, mesh, int(chunk))(
            params, data, scalar(len(rows), dtype), scalar(weight_decay, dtype), linear_flat, scalar(tol, dtype),
            scalar(max_iter, np.int32))
    return {"params": params}, FullBatchInfo(int(iterations), float(grad_norm), bool(converged))
