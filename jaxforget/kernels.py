"""The shared numerical kernels every jaxforget method calls.

* Tree math comes from ``optax.tree`` (``vdot`` at ``HIGHEST`` precision, so GPU float32 inner products never
  fall back to TF32; ``norm``, ``add_scale``, ``cast``, ``random_like``...) and ravelling from
  ``jax.flatten_util.ravel_pytree``; this module adds what they do not provide.
* Parameter splits (frozen prefix vs linearized suffix) and the linearized model
  ``f(x; w_u) = f_core(x) + J_core(x) w_u`` through ``jax.jvp``.
* Curvature products, all matrix-free: Gauss-Newton ``Σ J_iᵀ H_out J_i v`` (jvp + transpose),
  Hessian-vector products (forward-over-reverse), empirical-Fisher products (one jvp and one vjp, no
  per-example gradient stored), per-example gradients by ``vmap(grad)``, and per-example Jacobians.
* A pytree (preconditioned) conjugate-gradient solver written with ``lax.while_loop`` that reports
  iterations and the *true* final residual, with residual replacement so float32 drift cannot fake
  convergence.

Solvers built on these live in :mod:`jaxforget.solvers` (Newton-CG, its mixed-precision refinement, the Nyström
preconditioner) and :mod:`jaxforget.woodbury` (direct Woodbury / Schur removal). Nothing here materialises a P×P
matrix. Sums over a dataset are composed with :func:`jaxforget.mesh.data_parallel_sum`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from jaxforget import errors

PyTree = Any
Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# --------------------------------------------------------------------------------------------------
# Parameter splits and the linearized model
# --------------------------------------------------------------------------------------------------


def split_params(params: PyTree, predicate: Callable[[tuple[str, ...]], bool]) -> tuple[PyTree, PyTree]:
    """Splits a nested-dict parameter tree into ``(lin, fix)`` by a predicate on leaf paths.

    Args:
      params: nested dict of arrays (flax ``params``).
      predicate: ``path -> bool``; ``True`` puts the leaf in the linearized subtree ``lin``.

    Returns:
      ``(lin, fix)``, two nested dicts whose union is ``params``.

    Examples:
      >>> lin, fix = split_params({"a": {"w": 1}, "b": {"w": 2}}, lambda p: p[0] == "b")
      >>> lin, fix
      ({'b': {'w': 2}}, {'a': {'w': 1}})
    """
    flat = traverse_util.flatten_dict(params)
    lin = {k: v for k, v in flat.items() if predicate(k)}
    fix = {k: v for k, v in flat.items() if not predicate(k)}
    return traverse_util.unflatten_dict(lin), traverse_util.unflatten_dict(fix)


def merge_params(fix: PyTree, lin: PyTree) -> PyTree:
    """Inverse of :func:`split_params`."""
    flat = dict(traverse_util.flatten_dict(fix))
    flat.update(traverse_util.flatten_dict(lin))
    return traverse_util.unflatten_dict(flat)


def jvp_outputs(f: Callable[[PyTree], Array], primal: PyTree, tangent: PyTree) -> tuple[Array, Array]:
    """``(f(primal), J tangent)`` with ``J = ∂f/∂primal``, by one forward-mode pass."""
    return jax.jvp(f, (primal,), (tangent,))


def linearized_apply(f: Callable[[PyTree], Array], primal: PyTree, w_u: PyTree) -> Array:
    r"""The linearized model :math:`f(w_c) + J(w_c)\, w_u`.

    Args:
      f: ``params -> outputs [B, K]`` on a fixed batch (the core network with its frozen part bound).
      primal: core values of the linearized parameters ``w_c`` (the Jacobian is always taken here).
      w_u: user weights, same structure as ``primal``.

    Returns:
      ``[B, K]`` outputs; equals ``f(primal)`` exactly when ``w_u = 0``.

    Examples:
      >>> f = lambda p: jnp.tanh(p["w"] * jnp.arange(3.0))[None]
      >>> linearized_apply(f, {"w": 0.5}, {"w": 0.0}).tolist() == f({"w": 0.5}).tolist()
      True

    References:
      Golatkar et al., Mixed-Privacy Forgetting in Deep Networks, CVPR 2021, eq. 5.
    """
    y0, jv = jvp_outputs(f, primal, w_u)
    return y0 + jv


def gn_matvec_sum(
    f: Callable[[PyTree], Array],
    primal: PyTree,
    v: PyTree,
    weights: Array,
    out_hvp: Callable[[Array, Array], Array] | None = None,
) -> PyTree:
    r"""Weighted Gauss-Newton product :math:`\sum_i c_i J_i^\top H^{out}_i J_i v` on one batch.

    One linearisation gives ``J v`` (forward) and its transpose gives ``Jᵀ u`` (reverse).

    Args:
      f: ``params -> outputs [B, K]`` on a fixed batch.
      primal: linearisation point (pytree).
      v: tangent, same structure as ``primal``.
      weights: ``[B]`` per-example weights ``c_i`` (0 for padding or removed samples).
      out_hvp: ``(outputs [B, K], u [B, K]) -> [B, K]``, the loss Hessian in output space applied
        per example; ``None`` means the identity (square loss, where GN is the exact Hessian).

    Returns:
      A pytree shaped like ``primal``.
    """
    y0, f_jvp = jax.linearize(f, primal)
    jv = f_jvp(v)
    if out_hvp is not None:
        jv = out_hvp(y0, jv)
    jv = jv * weights.astype(jv.dtype)[:, None]
    (jtjv,) = jax.linear_transpose(f_jvp, primal)(jv)
    return jtjv


def softmax_out_hvp(logits: Array, u: Array) -> Array:
    r"""Cross-entropy Hessian in logit space applied per example: :math:`(\mathrm{diag}(p) - pp^\top) u`."""
    p = jax.nn.softmax(logits, axis=-1)
    return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)


def square_loss_grad_sum(
    f: Callable[[PyTree], Array],
    primal: PyTree,
    w_u: PyTree,
    targets: Array,
    weights: Array,
) -> tuple[PyTree, Array]:
    r"""Weighted residual gradient and loss of the linearized square loss on one batch.

    With :math:`r_i = f(w_c)(x_i) + J_i w_u - t_i`, returns
    :math:`(\sum_i c_i J_i^\top r_i,\ \tfrac12 \sum_i c_i \lVert r_i \rVert^2)`.

    Args:
      f: ``params -> outputs [B, K]`` on a fixed batch.
      primal: core values of the linearized parameters.
      w_u: user weights (same structure).
      targets: ``[B, K]`` regression targets (scaled one-hot).
      weights: ``[B]`` per-example weights.

    Returns:
      ``(grad_sum, loss_sum)``.
    """
    y0, f_jvp = jax.linearize(f, primal)
    r = y0 + f_jvp(w_u) - targets
    c = weights.astype(r.dtype)[:, None]
    (g,) = jax.linear_transpose(f_jvp, primal)(r * c)
    return g, 0.5 * jnp.sum(c * r * r)


def hvp(loss: Callable[..., Array], params: PyTree, v: PyTree, *args) -> PyTree:
    r"""Hessian-vector product :math:`\nabla^2 L(\theta) v` by forward-over-reverse differentiation.

    Examples:
      >>> loss = lambda p: 0.5 * (3.0 * p["a"] ** 2)
      >>> float(hvp(loss, {"a": 1.0}, {"a": 2.0})["a"])
      6.0
    """
    return jax.jvp(lambda p: jax.grad(loss)(p, *args), (params,), (v,))[1]


def example_cross_entropy(model: Any, rest: PyTree) -> Callable[[PyTree, Array, Array], Array]:
    """``(params, x, y) -> ℓ``: the softmax cross-entropy of one example (no batch axis) of a Flax classifier in
    eval mode (``rest``: its other collections, e.g. BatchNorm statistics), for per-example derivatives.

    Examples:
      >>> from jaxforget import models
      >>> model = models.MLP(hidden=(), num_classes=3)
      >>> params = jax.tree.map(jnp.zeros_like, models.init_variables(model, jax.random.key(0), (2,))["params"])
      >>> loss = example_cross_entropy(model, {})
      >>> bool(jnp.isclose(loss(params, jnp.zeros(2), jnp.int32(1)), jnp.log(3.0)))
      True
    """

    def loss(params, x, y):
        logits = model.apply({"params": params, **rest}, x[None], train=False)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss


def weighted_cross_entropy_sum(model: Any, rest: PyTree, params: PyTree, x: Array, y: Array,
                               weights: Array) -> Array:
    """``Σ_b w_b ℓ_b(θ)`` over a batch in eval mode (``w_b = 0`` for padding rows): its gradient is ``Σ_b w_b g_b``
    and its Hessian ``Σ_b w_b ∇²ℓ_b``."""
    logits = model.apply({"params": params, **rest}, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weights.astype(losses.dtype) * losses)


def per_example_grads(loss_one: Callable[..., Array], params: PyTree, *batch: Array) -> PyTree:
    """Per-example gradients ``[B, ...]`` by ``vmap(grad)`` (never a batch-size-1 loop).

    Args:
      loss_one: ``(params, *example) -> scalar`` for one unbatched example.
      params: pytree.
      *batch: arrays with a leading batch dimension.

    Returns:
      A pytree shaped like ``params`` with a leading ``[B]`` axis on every leaf.
    """
    return jax.vmap(jax.grad(loss_one), in_axes=(None,) + (0,) * len(batch))(params, *batch)


def fisher_matvec_sum(
    loss_one: Callable[..., Array], params: PyTree, v: PyTree, weights: Array, *batch: Array
) -> PyTree:
    r"""Weighted empirical-Fisher product :math:`\sum_i c_i g_i (g_i^\top v)` on one batch.

    :math:`g_i^\top v` is one vmapped JVP; :math:`\sum_i s_i g_i` is the gradient of
    :math:`\sum_i s_i \ell_i` with :math:`s_i` held constant, so no ``[B, P]`` gradient is stored.
    """
    per_loss = lambda p: jax.vmap(loss_one, in_axes=(None,) + (0,) * len(batch))(p, *batch)
    _, gv = jax.jvp(per_loss, (params,), (v,))
    s = jax.lax.stop_gradient(gv * weights.astype(gv.dtype))
    return jax.grad(lambda p: jnp.sum(s * per_loss(p)))(params)


# --------------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------------


class CGInfo(NamedTuple):
    """Diagnostics of :func:`cg_solve` (all device scalars).

    Attributes:
      iterations: int32, matvecs spent on CG steps (the final true-residual check excluded).
      residual_norm: ``‖b − A x‖`` recomputed from scratch at the end.
      rel_residual: ``residual_norm / ‖b‖`` (0 when ``b = 0``).
      converged: whether ``residual_norm ≤ max(tol·‖b‖, atol)``.
      restarts: residual replacements performed (float32 drift corrections).
    """

    iterations: Array
    residual_norm: Array
    rel_residual: Array
    converged: Array
    restarts: Array


def cg_solve(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None = None,
    *,
    tol: float | Array = 1e-5,
    atol: float | Array = 0.0,
    maxiter: int | Array = 1000,
    precond: Callable[[PyTree], PyTree] | None = None,
    max_restarts: int = 8,
    x_ref: PyTree | None = None,
    ref_tol: float | Array = 0.0,
) -> tuple[PyTree, CGInfo]:
    r"""Solves :math:`A x = b` for symmetric positive-definite ``A`` given only ``v ↦ A v``.

    Preconditioned conjugate gradients on pytrees. The stopping rule is on the residual
    :math:`\lVert b - A x\rVert \le \max(\mathrm{tol}\,\lVert b\rVert, \mathrm{atol})`. The recursive
    residual drifts from the true one in float32, so when it reports convergence the true residual is
    recomputed; if that is still too large CG restarts from the current ``x`` with the true residual
    (residual replacement), at most ``max_restarts`` times. Traceable: ``tol``, ``atol`` and ``maxiter``
    may be traced, so one compiled solver serves every request. This function never raises; call
    :func:`check_converged` on the host afterwards.

    Args:
      matvec: maps a pytree shaped like ``b`` to ``A`` times it.
      b: right-hand side, a pytree of float arrays.
      x0: initial guess (warm start); zeros by default.
      tol: relative tolerance on the residual.
      atol: absolute tolerance on the residual.
      maxiter: budget of CG iterations (matvecs), restarts included.
      precond: ``r ↦ M⁻¹ r`` for an SPD preconditioner ``M ≈ A``; ``None`` for plain CG.
      max_restarts: cap on residual replacements.
      x_ref: a known solution (benchmarks only): CG also stops once
        :math:`\lVert x - x_\mathrm{ref}\rVert \le \mathrm{ref\_tol}\,\lVert x_\mathrm{ref}\rVert`, which
        counts the iterations a solver needs to reach a given error (``info.converged`` stays residual-based).
      ref_tol: relative error at which ``x_ref`` stops CG.

    Returns:
      ``(x, info)`` with ``info`` a :class:`CGInfo`.

    Examples:
      >>> A = jnp.array([[4., 1.], [1., 3.]])
      >>> x, info = cg_solve(lambda v: A @ v, jnp.array([1., 2.]))
      >>> print(jnp.round(x, 4), bool(info.converged))
      [0.0909 0.6364] True

    References:
      Hestenes & Stiefel (1952); Golatkar et al., Mixed-Privacy Forgetting, CVPR 2021, eq. 11.
    """
    precond = precond if precond is not None else (lambda r: r)
    x = optax.tree.zeros_like(b) if x0 is None else x0
    b_norm = optax.tree.norm(b)
    dtype = b_norm.dtype
    threshold = jnp.maximum(jnp.asarray(tol, dtype) * b_norm, jnp.asarray(atol, dtype))
    maxiter = jnp.asarray(maxiter, jnp.int32)

    def far(x):
        """Whether ``x`` is still farther from ``x_ref`` than ``ref_tol`` (always, without a reference)."""
        if x_ref is None:
            return jnp.asarray(True)
        return optax.tree.norm(optax.tree.sub(x, x_ref)) > jnp.asarray(ref_tol, dtype) * optax.tree.norm(x_ref)

    def true_residual(x):
        return optax.tree.sub(b, matvec(x))

    def inner(carry):
        """Plain PCG from the current x and its true residual, until the recursive residual passes."""
        x, r, k = carry
        z = precond(r)
        state = (x, r, z, z, optax.tree.vdot(r, z), k)

        def cond(s):
            x, r, _, _, _, k = s
            return (optax.tree.norm(r) > threshold) & (k < maxiter) & far(x)

        def body(s):
            x, r, z, p, rz, k = s
            ap = matvec(p)
            alpha = rz / optax.tree.vdot(p, ap)
            x = optax.tree.add_scale(x, alpha, p)
            r = optax.tree.add_scale(r, -alpha, ap)
            z = precond(r)
            rz_new = optax.tree.vdot(r, z)
            p = optax.tree.add_scale(z, rz_new / rz, p)
            return x, r, z, p, rz_new, k + 1

        x, _, _, _, _, k = jax.lax.while_loop(cond, body, state)
        return x, k

    def outer_cond(s):
        x, r, k, restarts = s
        return (optax.tree.norm(r) > threshold) & (k < maxiter) & (restarts <= max_restarts) & far(x)

    def outer_body(s):
        x, r, k, restarts = s
        x, k = inner((x, r, k))
        return x, true_residual(x), k, restarts + 1

    r0 = true_residual(x) if x0 is not None else b
    x, r, k, restarts = jax.lax.while_loop(
        outer_cond, outer_body, (x, r0, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    )
    res = optax.tree.norm(r)
    rel = jnp.where(b_norm > 0, res / jnp.where(b_norm > 0, b_norm, 1), res)
    info = CGInfo(
        iterations=k,
        residual_norm=res,
        rel_residual=rel,
        converged=res <= threshold,
        restarts=jnp.maximum(restarts - 1, 0),
    )
    return x, info


def check_converged(info: CGInfo, *, what: str = "CG solve", on_fail: str = "raise") -> None:
    """Host-side check of a :class:`CGInfo`; raises :class:`~jaxforget.errors.CGNotConvergedError`.

    Args:
      info: diagnostics returned by :func:`cg_solve` (concrete values).
      what: name of the solve, used in the message.
      on_fail: ``"raise"`` (default) or ``"warn"`` (emit a ``RuntimeWarning`` and carry on).

    Raises:
      NonFiniteError: if the residual is NaN/Inf (the operator or right-hand side is not finite).
      CGNotConvergedError: if not converged and ``on_fail == "raise"``.
    """
    if on_fail not in ("raise", "warn"):
        raise errors.ConfigError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}.")
    res = float(info.residual_norm)
    if not np.isfinite(res):
        raise errors.NonFiniteError(f"{what}: the residual is not finite ({res}); inputs or weights contain NaN/Inf.")
    if bool(info.converged):
        return
    msg = (
        f"{what} did not converge: relative residual {float(info.rel_residual):.3e} "
        f"(absolute {res:.3e}) after {int(info.iterations)} iterations. Raise maxiter, loosen tol, "
        "or add a preconditioner."
    )
    if on_fail == "raise":
        raise errors.CGNotConvergedError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------------
# Per-example Jacobians (the rows of the linearized least-squares problem)
# --------------------------------------------------------------------------------------------------


def per_example_jacobian(f_one: Callable[[PyTree, Array], Array], primal: PyTree, xs: Array) -> Array:
    r"""Per-example output Jacobians :math:`J_i = \partial f(x_i)/\partial w`, ravelled: ``[B, K, P]``.

    One reverse pass per output (``K`` VJPs) per example; the column order is that of
    ``jax.flatten_util.ravel_pytree`` on ``primal``.

    Args:
      f_one: ``(params, x) -> [K]`` outputs of a single example ``x`` (no batch axis).
      primal: linearisation point (pytree with ``P`` entries).
      xs: ``[B, ...]`` examples.

    Returns:
      ``[B, K, P]``.

    Examples:
      >>> f_one = lambda p, x: p["w"] @ x
      >>> per_example_jacobian(f_one, {"w": jnp.ones((2, 3))}, jnp.eye(3)[:1]).shape
      (1, 2, 6)
    """

    def one(x):
        jac = jax.jacrev(lambda p: f_one(p, x))(primal)
        return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(jac)], axis=1)

    return jax.vmap(one)(xs)


def jacobian_times(f: Callable[[PyTree], Array], primal: PyTree, tangents: Array) -> Array:
    r"""``J T`` for many tangents at once: ``[B, K, T]`` from ravelled tangents ``T: [T, P]``.

    One forward-mode pass per tangent, vmapped (the primal computation is shared): this is how a block
    of Gram columns :math:`J J_A^\top` is computed without forming ``J`` for the whole dataset.

    Args:
      f: ``params -> [B, K]`` on a fixed batch.
      primal: linearisation point.
      tangents: ``[T, P]`` ravelled tangent vectors.
    """
    _, unravel = ravel_pytree(primal)
    jv = lambda t: jax.jvp(f, (primal,), (unravel(t),))[1]
    return jax.vmap(jv, out_axes=-1)(tangents)
