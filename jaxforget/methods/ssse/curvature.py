r"""SSSE's curvature: the per-sample terms that make it, the structures that hold it, and solves with it.

Every curvature here is, in mean units over the ``N`` samples whose terms it holds,

.. math::  C = \tfrac1N A + \lambda' I, \qquad A = \sum_{i \in T} M_i, \qquad \lambda' = \lambda + \lambda_{wd},

with the per-sample term ``M_i`` of the chosen kind, all at the parameters ``θ`` the structure stands for:

* ``gauss_newton`` (the default): :math:`M_i = J_i^\top (\mathrm{diag}(p_i) - p_i p_i^\top) J_i = R_i^\top R_i`,
  with ``K`` rows :math:`R_{ik} = \sqrt{p_{ik}}\,(J_{ik} - p_i^\top J_i)` (``J_i`` the logit Jacobian);
* ``empirical_fisher`` (the paper's): :math:`M_i = g_i g_i^\top`, one row :math:`R_i = g_i = \nabla \ell_i`;
* ``hessian``: :math:`M_i = \nabla^2 \ell_i` (not PSD off the optimum; dense or matrix-free only).

Structures (``A`` is held in sum form so that a deletion subtracts its samples' terms exactly):

* ``dense``: ``A`` itself ``[P, P]`` (asked for, and ``P ≤ max_dense_params``);
* ``block``: the diagonal blocks of ``A`` over contiguous runs of ``block_size`` entries of each parameter leaf
  (``[n_blocks, b, b]``, WoodFisher style): cross-block curvature is ignored, memory ``P·b``;
* ``woodbury``: the rows ``R`` of ``m`` stored samples, :math:`C^{-1}u = \tfrac{1}{\lambda'}(u - G^\top
  (m\lambda' I + G G^\top)^{-1} G u)` with ``G`` the stacked rows (memory ``m·r·P``, one ``mr × mr`` Cholesky);
* ``cg``: nothing stored; matrix-free CG on the retained data (needs the training data at erase time).

Examples:
  >>> import jax.numpy as jnp
  >>> lay = layout({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, "block", block_size=4)
  >>> lay.blocks.tolist()  # leaf "b" (2 entries) then "w" (6 entries: a block of 4 and one of 2, padded with P)
  [[0, 1, 8, 8], [2, 3, 4, 5], [6, 7, 8, 8]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from jaxforget import errors, kernels

PyTree = Any
Array = jax.Array

KINDS = ("gauss_newton", "empirical_fisher", "hessian")
STRUCTURES = ("dense", "block", "woodbury", "cg")


@struct.dataclass
class Curvature:
    """The curvature object of an SSSE state (checkpointed with it).

    Attributes:
      matrix: ``dense``: ``A`` ``[P, P]``; ``block``: ``[n_blocks, b, b]``; ``woodbury``: the stored samples' rows
        ``[m, r, P]`` (zeros for a removed sample); ``cg``: ``[1]`` (nothing).
      owner: ``int32[m]`` (``woodbury``): the training position of each stored sample, ``-1`` once removed;
        ``[-1]`` otherwise (checkpoints hold no empty arrays).
      count: ``int32[]`` samples whose terms ``A`` holds (``N``; ``cg``: the retained samples).
      damping: ``float32[]`` ``λ`` in mean units, fixed when the curvature was built.
      layout: ``int32[2]`` (kind, structure) as indices into :data:`KINDS` and :data:`STRUCTURES`.
      params: ``uint32[8]`` SHA-256 of the parameters it stands for (a state's curvature must match its model).
    """

    matrix: Array
    owner: Array
    count: Array
    damping: Array
    layout: Array
    params: Array


class Layout(NamedTuple):
    """Static shape information of one structure over one parameter pytree."""

    structure: str
    num_params: int
    blocks: np.ndarray  # int32[n_blocks, b]: indices into the ravelled parameters, ``num_params`` for padding


def layout(params: PyTree, structure: str, *, block_size: int = 256) -> Layout:
    """The :class:`Layout` of ``structure`` over ``params``: for ``block``, each leaf (in ravel order) cut into
    contiguous blocks of ``block_size`` (the last one of a leaf padded with index ``P``)."""
    sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(params)]
    total = sum(sizes)
    if structure != "block":
        return Layout(structure, total, np.zeros((0, 0), np.int32))
    rows, start = [], 0
    for size in sizes:
        for lo in range(0, size, block_size):
            idx = np.full(block_size, total, np.int32)
            width = min(block_size, size - lo)
            idx[:width] = np.arange(start + lo, start + lo + width)
            rows.append(idx)
        start += size
    return Layout(structure, total, np.stack(rows))


# --------------------------------------------------------------------------------------------------
# Per-sample terms
# --------------------------------------------------------------------------------------------------


def example_loss(model: nn.Module, rest: PyTree) -> Callable[[PyTree, Array, Array], Array]:
    """``(params, x, y) -> ℓ`` of one example (no batch axis), softmax cross-entropy in eval mode."""

    def loss(params, x, y):
        logits = model.apply({"params": params, **rest}, x[None], train=False)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss


def weighted_loss_sum(model: nn.Module, rest: PyTree, params: PyTree, x: Array, y: Array, weights: Array) -> Array:
    """``Σ_i w_i ℓ_i(θ)`` over a batch (eval mode): its gradient is ``Σ_i w_i g_i``, its Hessian ``Σ_i w_i ∇²ℓ_i``."""
    losses = jax.vmap(example_loss(model, rest), (None, 0, 0))(params, x, y)
    return jnp.sum(weights.astype(losses.dtype) * losses)


def rows(kind: str, model: nn.Module, params: PyTree, rest: PyTree, x: Array, y: Array) -> Array:
    """The rows ``R_i`` with ``M_i = R_iᵀR_i``: ``[B, r, P]`` (``r = K`` for ``gauss_newton``, 1 for
    ``empirical_fisher``), columns in ``ravel_pytree(params)`` order."""
    if kind == "empirical_fisher":
        grads = kernels.per_example_grads(example_loss(model, rest), params, x, y)
        return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)[:, None, :]
    if kind != "gauss_newton":
        raise errors.ConfigError(f"curvature {kind!r} has no rows (it is not a sum of outer products).")
    f_one = lambda p, xi: model.apply({"params": p, **rest}, xi[None], train=False)[0]
    jac = kernels.per_example_jacobian(f_one, params, x)  # [B, K, P]
    probs = jax.nn.softmax(jax.vmap(lambda xi: f_one(params, xi))(x)).astype(jac.dtype)
    centred = jac - jnp.einsum("bk,bkp->bp", probs, jac)[:, None, :]
    return jnp.sqrt(probs)[..., None] * centred


def term_sum(kind: str, lay: Layout, model: nn.Module, params: PyTree, rest: PyTree, x: Array, y: Array,
             weights: Array) -> Array:
    """``Σ_i w_i M_i`` over one batch in ``lay``'s form (``dense`` ``[P, P]``, ``block`` ``[n_blocks, b, b]``)."""
    if kind == "hessian":
        if lay.structure != "dense":
            raise errors.ConfigError("curvature 'hessian' is held only densely (structure 'dense' or 'cg').")
        flat, unravel = ravel_pytree(params)
        loss = example_loss(model, rest)
        hess = jax.vmap(jax.hessian(lambda v, xi, yi: loss(unravel(v), xi, yi)), in_axes=(None, 0, 0))(flat, x, y)
        return jnp.einsum("b,bpq->pq", weights.astype(hess.dtype), hess)
    r = rows(kind, model, params, rest, x, y)
    r = r * weights.astype(r.dtype)[:, None, None]  # weights are 0/1: w·RᵀR = (wR)ᵀ(wR)
    if lay.structure == "dense":
        return jnp.einsum("brp,brq->pq", r, r)
    padded = jnp.concatenate([r, jnp.zeros((*r.shape[:2], 1), r.dtype)], axis=-1)[..., lay.blocks]
    return jnp.einsum("brnk,brnl->nkl", padded, padded)


def trace_sum(kind: str, model: nn.Module, params: PyTree, rest: PyTree, x: Array, y: Array,
              weights: Array) -> Array:
    """``Σ_i w_i tr(M_i)`` (``hessian`` uses the Gauss-Newton rows: the same diagonal scale, and PSD)."""
    r = rows("empirical_fisher" if kind == "empirical_fisher" else "gauss_newton", model, params, rest, x, y)
    return jnp.einsum("b,brp->", weights.astype(r.dtype), r * r)


# --------------------------------------------------------------------------------------------------
# Solves
# --------------------------------------------------------------------------------------------------


def shift(curv: Curvature, weight_decay: Array) -> Array:
    """``λ' = λ + λ_wd`` in the curvature's dtype."""
    return curv.damping.astype(curv.matrix.dtype) + weight_decay.astype(curv.matrix.dtype)


def solve(curv: Curvature, lay: Layout, u: Array, weight_decay: Array) -> tuple[Array, Array]:
    """``(C⁻¹u, ok)`` for a ravelled ``u`` ``[P]`` (``dense``, ``block``, ``woodbury``; ``cg`` is matrix-free, in
    the method); ``ok`` is False when ``C`` is not numerically positive definite (traceable: the caller raises
    :class:`CurvatureError` on the host)."""
    lam = shift(curv, weight_decay)
    n = jnp.maximum(curv.count, 1).astype(u.dtype)
    if lay.structure == "dense":
        chol = jnp.linalg.cholesky(curv.matrix / n + lam * jnp.eye(lay.num_params, dtype=u.dtype))
        out = jax.scipy.linalg.cho_solve((chol, True), u)
    elif lay.structure == "block":
        eye = jnp.eye(lay.blocks.shape[1], dtype=u.dtype)
        chol = jnp.linalg.cholesky(curv.matrix / n + (lam * eye)[None])
        ub = jnp.concatenate([u, jnp.zeros(1, u.dtype)])[lay.blocks]
        xb = jax.vmap(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b))(chol, ub)
        out = jnp.zeros(lay.num_params + 1, u.dtype).at[lay.blocks.reshape(-1)].set(xb.reshape(-1))[:-1]
    elif lay.structure == "woodbury":
        g = curv.matrix.reshape(-1, lay.num_params)  # removed samples' rows are zero
        small = g @ g.T + n * lam * jnp.eye(g.shape[0], dtype=u.dtype)
        chol = jnp.linalg.cholesky(small)
        out = (u - g.T @ jax.scipy.linalg.cho_solve((chol, True), g @ u)) / lam
    else:
        raise errors.ConfigError(f"structure {lay.structure!r} has no stored solve (it is matrix-free).")
    return out, jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(out))


GUARD_MESSAGE = ("The downdate guard tripped: the curvature after removing the erased samples' terms is not positive "
                 "definite (their terms at the current parameters exceed what it held); raise method.damping or use "
                 "method.structure='cg', which reads the retained data instead.")


def downdate(curv: Curvature, lay: Layout, removed: Array | None, positions: np.ndarray) -> Curvature:
    """``curv`` without the terms of the samples at ``positions`` (``removed``: their :func:`term_sum` for
    ``dense``/``block``; ``woodbury`` zeroes the stored rows of those samples, exactly, whatever the parameters).
    Every host value it moves is moved explicitly (requests run under a transfer guard)."""
    if lay.structure == "woodbury":
        owner = np.asarray(curv.owner)
        gone = np.isin(owner, positions)
        keep = jax.device_put((~gone).astype(curv.matrix.dtype))
        return curv.replace(matrix=curv.matrix * keep[:, None, None],
                            owner=jax.device_put(np.where(gone, -1, owner).astype(np.int32)),
                            count=jax.device_put(np.int32(int(curv.count) - int(gone.sum()))))
    count = jax.device_put(np.int32(int(curv.count) - len(positions)))
    if lay.structure == "cg":  # nothing held
        return curv.replace(count=count)
    return curv.replace(matrix=curv.matrix - removed, count=count)


def clip_to_psd(matrix: Array) -> tuple[Array, Array]:
    """``(A₊, clipped)``: ``A`` (``[P, P]`` or blocks ``[n, b, b]``) with its negative eigenvalues set to 0 (the
    nearest PSD matrix in Frobenius norm), and ``Σ|λ₋| / Σ|λ|``, the share of its spectrum that was removed.

    After the first request a downdate subtracts terms at the current parameters from a sum built at earlier ones;
    where the two differ more than the held curvature allows, the difference is indefinite. Clipping keeps the
    curvature a curvature; ``clipped`` measures how far the downdate was from exact (0 at the build parameters).

    Examples:
      >>> a, c = clip_to_psd(jnp.array([[1.0, 0.0], [0.0, -1.0]]))
      >>> a.tolist(), float(c)
      ([[1.0, 0.0], [0.0, 0.0]], 0.5)
    """
    sym = 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))
    vals, vecs = jnp.linalg.eigh(sym)
    kept = jnp.maximum(vals, 0)
    clipped = jnp.sum(jnp.abs(vals - kept)) / jnp.maximum(jnp.sum(jnp.abs(vals)), jnp.finfo(vals.dtype).tiny)
    return jnp.einsum("...ij,...j,...kj->...ik", vecs, kept, vecs), clipped


def nbytes(curv: Curvature) -> int:
    """Bytes the curvature object holds."""
    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(curv)))


__all__ = ["GUARD_MESSAGE", "KINDS", "STRUCTURES", "Curvature", "Layout", "clip_to_psd", "downdate", "example_loss",
           "layout", "nbytes", "rows", "solve", "term_sum", "trace_sum", "weighted_loss_sum"]
