"""The shared numerical kernels every jaxforget method calls.

* Tree math at ``HIGHEST`` precision without ravelling (as optax's ``tree.vdot``): CG inner products on
  sharded pytrees stay sharded, and GPU float32 matmuls never fall back to TF32.
* Parameter splits (frozen prefix vs linearized suffix) and the linearized model
  ``f(x; w_u) = f_core(x) + J_core(x) w_u`` through ``jax.jvp``.
* Curvature products, all matrix-free: Gauss-Newton ``Σ J_iᵀ H_out J_i v`` (jvp + transpose),
  Hessian-vector products (forward-over-reverse), empirical-Fisher products (one jvp and one vjp, no
  per-example gradient stored), and per-example gradients by ``vmap(grad)``.
* A pytree (preconditioned) conjugate-gradient solver written with ``lax.while_loop`` that reports
  iterations and the *true* final residual, with residual replacement so float32 drift cannot fake
  convergence; and power iteration for the largest eigenvalue.

Nothing here materialises a P×P matrix. Sums over a dataset are composed with
:func:`jaxforget.mesh.data_parallel_sum`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxforget import errors

PyTree = Any
Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# --------------------------------------------------------------------------------------------------
# Tree math
# --------------------------------------------------------------------------------------------------


def tree_vdot(a: PyTree, b: PyTree) -> Array:
    r"""Real inner product :math:`\sum_\ell \langle a_\ell, b_\ell \rangle` of two pytrees at HIGHEST precision.

    Uses ``tensordot`` per leaf rather than ``jnp.vdot``, which ravels (a copy, and communication on
    sharded arrays).

    Args:
      a, b: pytrees of the same structure and shapes.

    Returns:
      A scalar in the leaves' (promoted) dtype.

    Examples:
      >>> float(tree_vdot({"w": jnp.ones((2, 3))}, {"w": 2 * jnp.ones((2, 3))}))
      12.0
    """
    parts = jax.tree.leaves(
        jax.tree.map(lambda x, y: jnp.tensordot(x, y, axes=x.ndim, precision=HIGHEST), a, b)
    )
    return sum(parts[1:], parts[0])


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``."""
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``."""
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(s: Array | float, a: PyTree) -> PyTree:
    """Leafwise ``s * a`` for a scalar ``s`` (cast to each leaf's dtype)."""
    return jax.tree.map(lambda x: jnp.asarray(s, x.dtype) * x, a)


def tree_axpy(alpha: Array | float, x: PyTree, y: PyTree) -> PyTree:
    """Leafwise ``alpha * x + y``."""
    return jax.tree.map(lambda u, v: jnp.asarray(alpha, u.dtype) * u + v, x, y)


def tree_zeros_like(a: PyTree) -> PyTree:
    """Zeros with the structure, shapes and dtypes of ``a``."""
    return jax.tree.map(jnp.zeros_like, a)


def tree_norm(a: PyTree) -> Array:
    """Euclidean norm of a pytree seen as one vector."""
    return jnp.sqrt(tree_vdot(a, a))


def tree_size(a: PyTree) -> int:
    """Number of scalars in a pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(a))


def tree_cast(a: PyTree, dtype) -> PyTree:
    """Casts every floating leaf to ``dtype`` (integer leaves are kept)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, a)


def tree_random_normal(key: Array, like: PyTree) -> PyTree:
    """Standard-normal noise shaped like ``like``, one independent key per leaf."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])


def tree_ravel(a: PyTree) -> Array:
    """Concatenates all leaves into one vector (small problems and dense references only)."""
    return tree_ravel_with_unravel(a)[0]


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
# Conjugate gradient and power iteration
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
    x = tree_zeros_like(b) if x0 is None else x0
    b_norm = tree_norm(b)
    dtype = b_norm.dtype
    threshold = jnp.maximum(jnp.asarray(tol, dtype) * b_norm, jnp.asarray(atol, dtype))
    maxiter = jnp.asarray(maxiter, jnp.int32)

    def far(x):
        """Whether ``x`` is still farther from ``x_ref`` than ``ref_tol`` (always, without a reference)."""
        if x_ref is None:
            return jnp.asarray(True)
        return tree_norm(tree_sub(x, x_ref)) > jnp.asarray(ref_tol, dtype) * tree_norm(x_ref)

    def true_residual(x):
        return tree_sub(b, matvec(x))

    def inner(carry):
        """Plain PCG from the current x and its true residual, until the recursive residual passes."""
        x, r, k = carry
        z = precond(r)
        state = (x, r, z, z, tree_vdot(r, z), k)

        def cond(s):
            x, r, _, _, _, k = s
            return (tree_norm(r) > threshold) & (k < maxiter) & far(x)

        def body(s):
            x, r, z, p, rz, k = s
            ap = matvec(p)
            alpha = rz / tree_vdot(p, ap)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            z = precond(r)
            rz_new = tree_vdot(r, z)
            p = tree_axpy(rz_new / rz, p, z)
            return x, r, z, p, rz_new, k + 1

        x, _, _, _, _, k = jax.lax.while_loop(cond, body, state)
        return x, k

    def outer_cond(s):
        x, r, k, restarts = s
        return (tree_norm(r) > threshold) & (k < maxiter) & (restarts <= max_restarts) & far(x)

    def outer_body(s):
        x, r, k, restarts = s
        x, k = inner((x, r, k))
        return x, true_residual(x), k, restarts + 1

    r0 = true_residual(x) if x0 is not None else b
    x, r, k, restarts = jax.lax.while_loop(
        outer_cond, outer_body, (x, r0, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    )
    res = tree_norm(r)
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
    if not jnp.isfinite(res):
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


def power_iteration(
    matvec: Callable[[PyTree], PyTree], v0: PyTree, num_iters: int = 100
) -> tuple[Array, PyTree]:
    r"""Largest eigenvalue of a symmetric PSD operator by power iteration.

    Returns the Rayleigh quotient :math:`v^\top A v` of the final unit iterate, and the iterate.

    Examples:
      >>> lam, _ = power_iteration(lambda v: jnp.diag(jnp.array([1., 5., 2.])) @ v, jnp.ones(3), 50)
      >>> round(float(lam), 4)
      5.0
    """

    def body(_, v):
        w = matvec(v)
        return tree_scale(1.0 / tree_norm(w), w)

    v = jax.lax.fori_loop(0, num_iters, body, tree_scale(1.0 / tree_norm(v0), v0))
    return tree_vdot(v, matvec(v)), v


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
      like: a pytree with the structure of ``v``.
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
    flat, unravel = tree_ravel_with_unravel(like)
    p = flat.shape[0]
    omega = jax.random.normal(key, (p, rank), flat.dtype)
    omega, _ = jnp.linalg.qr(omega)
    apply_col = lambda col: tree_ravel_with_unravel(matvec(unravel(col)))[0]
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
    """

    def apply(r_tree):
        r, unravel = tree_ravel_with_unravel(r_tree)
        mu_ = jnp.asarray(mu, r.dtype)
        # r @ U, not Uᵀ @ r: XLA:CPU runs the transposed matvec ~8x slower (17 vs 2 ms at P = 26k, r = 400).
        coef = jnp.matmul(r, nys.u, precision=HIGHEST)
        scaled = coef * ((nys.lam[-1] + mu_) / (nys.lam + mu_))
        return unravel(r + jnp.matmul(nys.u, scaled - coef, precision=HIGHEST))

    return apply


def tree_ravel_with_unravel(tree: PyTree) -> tuple[Array, Callable[[Array], PyTree]]:
    """``(vector, unravel)``: all leaves concatenated, and the map back to the tree's structure."""
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.size for leaf in leaves]
    flat = jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])

    def unravel(vec):
        parts, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            parts.append(vec[start : start + size].reshape(shape))
            start += size
        return treedef.unflatten(parts)

    return flat, unravel


# --------------------------------------------------------------------------------------------------
# Direct solves: Gram matrices of the linearized least-squares problem and exact row removal
# --------------------------------------------------------------------------------------------------


def per_example_jacobian(f_one: Callable[[PyTree, Array], Array], primal: PyTree, xs: Array) -> Array:
    r"""Per-example output Jacobians :math:`J_i = \partial f(x_i)/\partial w`, ravelled: ``[B, K, P]``.

    One reverse pass per output (``K`` VJPs) per example; the column order is that of
    :func:`tree_ravel` on ``primal``.

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
    _, unravel = tree_ravel_with_unravel(primal)
    jv = lambda t: jax.jvp(f, (primal,), (unravel(t),))[1]
    return jax.vmap(jv, out_axes=-1)(tangents)


def spd_cholesky(matrix: Array) -> Array:
    r"""Lower Cholesky factor ``L`` (``LLᵀ = matrix``) of a symmetric positive-definite matrix.

    A matrix that is not numerically positive definite comes back with NaNs (callers check).

    Examples:
      >>> spd_cholesky(jnp.array([[4.0, 2.0], [2.0, 2.0]])).tolist()
      [[2.0, 0.0], [1.0, 1.0]]
    """
    return jnp.linalg.cholesky(matrix)


def cholesky_solve(chol: Array, rhs: Array) -> Array:
    """``(LLᵀ)⁻¹ rhs`` for ``rhs: [m]`` or ``[m, k]`` by two triangular solves (``2m²k`` flops)."""
    return jax.scipy.linalg.cho_solve((chol, True), rhs)


def cholesky_inverse(chol: Array) -> Array:
    r"""The explicit inverse :math:`(LL^\top)^{-1}` of an SPD matrix from its lower Cholesky factor ``L``.

    On CPU LAPACK's ``potri`` (``~2m³/3`` flops, in place on a host copy); elsewhere two triangular solves
    against the identity (``2m³`` flops, but at accelerator speed and without a host round trip).

    Raises:
      DirectSolveError: LAPACK reports a singular factor.

    Examples:
      >>> cholesky_inverse(jnp.array([[2.0, 0.0], [1.0, 1.0]])).tolist()  # L Lᵀ = [[4, 2], [2, 2]]
      [[0.5, -0.5], [-0.5, 1.0]]
    """
    if jax.default_backend() != "cpu":
        return cholesky_solve(chol, jnp.eye(chol.shape[0], dtype=chol.dtype))
    from scipy.linalg import lapack  # pylint: disable=import-outside-toplevel

    inv, info = lapack.dpotri(np.array(chol, np.float64, order="F"), lower=1, overwrite_c=1)
    if info != 0:
        raise errors.DirectSolveError(f"LAPACK potri failed (info={info}) on a {inv.shape[0]}² Cholesky factor.")
    return jnp.asarray(np.tril(inv) + np.tril(inv, -1).T)  # potri fills the lower triangle only


def dual_remove_rows(inv_rows: Array, a_full: Array, rhs_rows: Array, rows: Array, valid: Array,
                     num_valid: Array | None = None, *, chunk: int = 64) -> Array:
    r"""Solution of a linear system after deleting rows and columns ``F``, by the Schur complement.

    For an SPD ``M`` (the dual matrix :math:`JJ^\top + \lambda I` over all rows) and a right-hand side
    ``t``, the reduced system :math:`M_{RR}\,\alpha_R = t_R` is solved exactly from quantities of the
    full system. With :math:`C = M^{-1}_{:F}` and :math:`a = M^{-1}t`:

    .. math::  c = (M^{-1}_{FF})^{-1}\,(a_F - M^{-1}_{FF}\, t_F),\qquad
               \alpha = a - C\,(t_F + c) ,

    and ``α`` vanishes on ``F``. Only the ``|F| × |F|`` block enters the small solve, so the ``[|F|, N]``
    rows are read once. Cost :math:`O(N|F| + |F|^3)` once the rows of :math:`M^{-1}` at ``F`` are known
    (``M⁻¹`` is symmetric: its rows are its columns; the caller caches them across requests).

    Args:
      inv_rows: ``[F, N]`` rows :math:`M^{-1}_{F:}` (padding rows arbitrary: ignored where ``valid`` is False).
      a_full: ``[N]`` :math:`M^{-1} t`.
      rhs_rows: ``[F]`` :math:`t_F`.
      rows: ``[F]`` int indices of the removed rows (padding entries in range).
      valid: ``[F]`` bool, ``False`` on padding (a padded slot is an identity block: it changes nothing).
      num_valid: optional int scalar: the valid slots are the first ``num_valid`` (a buffer sized for a whole
        stream of requests); the ``[F, N]`` product then reads only those rows, ``chunk`` at a time, so that
        a request costs in proportion to the rows removed so far, not to the buffer's width.
      chunk: rows per step of that product.

    Returns:
      ``[N]`` the reduced solution, zero on ``F``.

    Examples:
      >>> m = jnp.array([[4., 1., 0.], [1., 3., 1.], [0., 1., 2.]]); t = jnp.array([1., 2., 3.])
      >>> inv = jnp.linalg.inv(m); f = jnp.array([1])
      >>> alpha = dual_remove_rows(inv[f], inv @ t, t[f], f, jnp.array([True]))
      >>> bool(jnp.allclose(alpha[jnp.array([0, 2])], jnp.linalg.solve(m[::2, ::2], t[::2]), atol=1e-5))
      True
    """
    # Only the small quantities are masked (the [F, N] rows are never copied): the padded block is an
    # uncoupled identity with a zero right-hand side, so its coefficients are exactly zero.
    keep = valid.astype(inv_rows.dtype)
    block = inv_rows[:, rows] * keep[:, None] * keep[None, :]
    rhs_f = rhs_rows * keep
    a_f = (a_full[rows] - jnp.matmul(block, rhs_f, precision=HIGHEST)) * keep
    coef = jnp.linalg.solve(block + jnp.diag(1.0 - keep), a_f)
    coef = (rhs_f + coef) * keep
    if num_valid is None:
        return a_full - jnp.matmul(coef, inv_rows, precision=HIGHEST)
    width = inv_rows.shape[0]
    size = min(chunk, width)

    def step(i, acc):
        lo = i * size
        start = jnp.minimum(lo, width - size)  # the last chunk is shifted back in range; its overlap is masked
        fresh = (start + jnp.arange(size, dtype=start.dtype) >= lo).astype(coef.dtype)
        part = jax.lax.dynamic_slice_in_dim(coef, start, size) * fresh
        rows_i = jax.lax.dynamic_slice_in_dim(inv_rows, start, size, axis=0)
        return acc + jnp.matmul(part, rows_i, precision=HIGHEST)

    return a_full - jax.lax.fori_loop(0, (num_valid + size - 1) // size, step, jnp.zeros_like(a_full))


def primal_remove_rows(inv: Array, rhs: Array, jac_rows: Array, target_rows: Array) -> tuple[Array, Array]:
    r"""The primal system after removing rows, as an inverse update: :math:`(A - J_F^\top J_F)^{-1}`.

    For :math:`A = J^\top J + \lambda I` held as its explicit inverse and :math:`b = J^\top t`, with
    :math:`U = A^{-1} J_F^\top` and :math:`S = I - J_F U = LL^\top` (positive definite for
    :math:`\lambda > 0`), Woodbury gives

    .. math::  (A - J_F^\top J_F)^{-1} = A^{-1} + (L^{-1}U^\top)^\top (L^{-1}U^\top),
               \qquad b_R = b - J_F^\top t_F ,

    symmetric by construction, in :math:`O(P^2|F| + |F|^3)`. A stream of requests applies it to each
    request's new rows only. When ``|F| > P`` the ``P × P`` form :math:`(I - U J_F)^{-1} A^{-1}` is cheaper
    (:math:`O(P^2|F| + P^3)`). Zero rows (padding) are identity rows of ``S``: they change nothing.

    Args:
      inv: ``[P, P]`` :math:`A^{-1}` (symmetric).
      rhs: ``[P]`` :math:`b`.
      jac_rows: ``[F, P]`` Jacobian rows of the removed outputs (zeros for padding).
      target_rows: ``[F]`` their targets (zeros for padding).

    Returns:
      ``(inv_R [P, P], rhs_R [P])``; the minimiser on the retained rows is ``inv_R @ rhs_R``.

    Examples:
      >>> j = jnp.array([[1., 0.], [0., 2.], [1., 1.]]); t = jnp.array([1., 2., 3.])
      >>> a = j.T @ j + 0.5 * jnp.eye(2)
      >>> inv_r, b_r = primal_remove_rows(jnp.linalg.inv(a), j.T @ t, j[2:], t[2:])
      >>> bool(jnp.allclose(inv_r @ b_r, jnp.linalg.solve(a - j[2:].T @ j[2:], j[:2].T @ t[:2]), atol=1e-5))
      True
    """
    num_rows, num_params = jac_rows.shape
    u = jnp.matmul(inv, jac_rows.T, precision=HIGHEST)  # [P, F]
    rhs_r = rhs - jnp.matmul(target_rows, jac_rows, precision=HIGHEST)
    if num_rows <= num_params:
        s = jnp.eye(num_rows, dtype=inv.dtype) - jnp.matmul(jac_rows, u, precision=HIGHEST)
        v = jax.scipy.linalg.solve_triangular(spd_cholesky(s), u.T, lower=True)  # [F, P]
        return inv + jnp.matmul(v.T, v, precision=HIGHEST), rhs_r
    m = jnp.eye(num_params, dtype=inv.dtype) - jnp.matmul(u, jac_rows, precision=HIGHEST)
    inv_r = jnp.linalg.solve(m, inv)
    return 0.5 * (inv_r + inv_r.T), rhs_r
