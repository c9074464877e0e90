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
* ``sherman_morrison``: the inverse ``(A + N_0 λ' I)⁻¹`` ``[P, P]`` itself (asked for, ``P ≤ max_dense_params``),
  built by the paper's Sherman–Morrison recursion over the samples' rows (in chunks, :func:`sherman_morrison_update`)
  and downdated the same way (:func:`sherman_morrison_downdate`, guarded). Its damping is absolute, fixed at the
  build's ``N_0``: after removing samples the mean-form shift is ``λ' N_0 / n_r`` (the drift of spec §4.3);
* ``cg``: nothing stored; matrix-free CG on the retained data (needs the training data at erase time).

Examples:
  >>> import jax.numpy as jnp
  >>> lay = layout({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, "block", block_size=4)
  >>> lay.blocks.tolist()  # leaf "b" (2 entries) then "w" (6 entries: a block of 4 and one of 2, padded with P)
  [[0, 1, 8, 8], [2, 3, 4, 5], [6, 7, 8, 8]]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from jaxforget import errors, kernels

PyTree = Any
Array = jax.Array

KINDS = ("gauss_newton", "empirical_fisher", "hessian")
STRUCTURES = ("dense", "block", "woodbury", "cg", "sherman_morrison")  # new ones appended: codes are stored


@struct.dataclass
class Curvature:
    """The curvature object of an SSSE state (checkpointed with it).

    Attributes:
      matrix: ``dense``: ``A`` ``[P, P]``; ``block``: ``[n_blocks, b, b]``; ``woodbury``: the stored samples' rows
        ``[m, r, P]`` (zeros for a removed sample); ``cg``: ``[1]`` (nothing); ``sherman_morrison``: the inverse
        ``(A + N_0 λ' I)⁻¹`` ``[P, P]``.
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


#: The per-example and weighted-sum cross-entropies (eval mode) every curvature term is built from.
example_loss = kernels.example_cross_entropy
weighted_loss_sum = kernels.weighted_cross_entropy_sum


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
    elif lay.structure == "sherman_morrison":  # the held inverse, in sum form: C⁻¹ = n · (A + N_0 λ' I)⁻¹
        out = n * (curv.matrix @ u)
        return out, jnp.all(jnp.isfinite(out))
    elif lay.structure == "woodbury":
        g = curv.matrix.reshape(-1, lay.num_params)  # removed samples' rows are zero
        small = g @ g.T + n * lam * jnp.eye(g.shape[0], dtype=u.dtype)
        chol = jnp.linalg.cholesky(small)
        out = (u - g.T @ jax.scipy.linalg.cho_solve((chol, True), g @ u)) / lam
    else:
        raise errors.ConfigError(f"structure {lay.structure!r} has no stored solve (it is matrix-free).")
    return out, jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(out))


def sherman_morrison_update(inverse: Array, rows_b: Array) -> Array:
    r"""``(A + G_bᵀG_b)⁻¹`` from ``A⁻¹`` ``[P, P]`` and ``b`` rows ``G_b`` ``[b, P]`` (Woodbury's identity; ``b = 1`` is
    the Sherman–Morrison rank-1 step of the paper, a larger ``b`` its matmul-friendly chunked form):

    .. math::  (A + G_b^\top G_b)^{-1} = A^{-1} - U (I_b + G_b U)^{-1} U^\top, \qquad U = A^{-1} G_b^\top.

    Zero rows change nothing (padding). ``I_b + G_bU`` is positive definite whenever ``A`` is.

    Examples:
      >>> inv = sherman_morrison_update(jnp.eye(2), jnp.array([[1.0, 0.0]]))
      >>> inv.tolist()  # (I + e1 e1ᵀ)⁻¹
      [[0.5, 0.0], [0.0, 1.0]]
    """
    u = inverse @ rows_b.T  # [P, b]
    chol = jnp.linalg.cholesky(jnp.eye(rows_b.shape[0], dtype=inverse.dtype) + rows_b @ u)
    w = jax.scipy.linalg.solve_triangular(chol, u.T, lower=True)  # [b, P]: U S⁻¹ Uᵀ = wᵀw
    out = inverse - w.T @ w
    return 0.5 * (out + out.T)


def sherman_morrison_inverse(rows_: Array, shift_sum: Array, *, chunk: int = 1) -> Array:
    r"""``(λ_s I + Σ_j r_j r_jᵀ)⁻¹`` ``[P, P]`` from the rows ``[N, P]`` by the Sherman–Morrison recursion: a scan
    of :func:`sherman_morrison_update` over chunks of ``chunk`` rows (``chunk = 1``: the rank-1 recursion, ``O(N P²)``
    time, ``O(P²)`` memory), starting from ``λ_s⁻¹ I``.

    Examples:
      >>> g = jnp.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
      >>> inv = sherman_morrison_inverse(g, jnp.float32(0.5), chunk=2)
      >>> bool(jnp.allclose(inv, jnp.linalg.inv(0.5 * jnp.eye(2) + g.T @ g), atol=1e-6))
      True
    """
    n, p = rows_.shape
    pad = -n % chunk
    blocks = jnp.concatenate([rows_, jnp.zeros((pad, p), rows_.dtype)]).reshape(-1, chunk, p)
    start = jnp.eye(p, dtype=rows_.dtype) / shift_sum.astype(rows_.dtype)
    return jax.lax.scan(lambda inv, g: (sherman_morrison_update(inv, g), None), start, blocks)[0]


def sherman_morrison_downdate(inverse: Array, rows_b: Array) -> tuple[Array, Array]:
    r"""``((A − G_bᵀG_b)⁻¹, ok)`` from ``A⁻¹`` (spec §4.3, chunked):

    .. math::  (A - G_b^\top G_b)^{-1} = A^{-1} + U (I_b - G_b U)^{-1} U^\top, \qquad U = A^{-1} G_b^\top,

    defined while ``I_b − G_bU`` is positive definite (``1 − gᵀA⁻¹g > 0`` for one row). ``ok`` is False when its
    Cholesky factor has a pivot below ``100·eps`` (the guard: the rows' terms are not, numerically, inside ``A``).

    Examples:
      >>> inv, ok = sherman_morrison_downdate(jnp.array([[0.5, 0.0], [0.0, 1.0]]), jnp.array([[1.0, 0.0]]))
      >>> inv.tolist(), bool(ok)
      ([[1.0, 0.0], [0.0, 1.0]], True)
    """
    u = inverse @ rows_b.T
    small = jnp.eye(rows_b.shape[0], dtype=inverse.dtype) - rows_b @ u
    chol = jnp.linalg.cholesky(0.5 * (small + small.T))
    pivots = jnp.diagonal(chol)
    ok = jnp.all(jnp.isfinite(chol)) & jnp.all(pivots * pivots > 100 * jnp.finfo(inverse.dtype).eps)
    w = jax.scipy.linalg.solve_triangular(chol, u.T, lower=True)
    out = inverse + w.T @ w
    return 0.5 * (out + out.T), ok & jnp.all(jnp.isfinite(out))


GUARD_MESSAGE = ("The downdate guard tripped: the curvature after removing the erased samples' terms is not positive "
                 "definite (their terms at the current parameters exceed what it held); raise method.damping or use "
                 "method.structure='cg', which reads the retained data instead.")


@jax.jit
def _downdate_or_nan(inverse: Array, rows_b: Array) -> Array:
    # A failed guard leaves no inverse: solve() then reports the curvature as not positive definite.
    out, ok = sherman_morrison_downdate(inverse, rows_b)
    return jnp.where(ok, out, jnp.nan)


def downdate(curv: Curvature, lay: Layout, removed: Array | None, positions: np.ndarray) -> Curvature:
    """``curv`` without the terms of the samples at ``positions`` (``removed``: their :func:`term_sum` for
    ``dense``/``block``, their rows ``[b, P]`` for ``sherman_morrison``, whose guard failing leaves NaN that
    :func:`solve` reports; ``woodbury`` zeroes the stored rows of those samples, exactly, whatever the parameters).
    Every host value it moves is moved explicitly (requests run under a transfer guard)."""
    if lay.structure == "sherman_morrison":  # removed: the erased samples' rows [b, P]
        return curv.replace(matrix=_downdate_or_nan(curv.matrix, removed),
                            count=jax.device_put(np.int32(int(curv.count) - len(positions))))
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


def indefinite_blocks(matrix: Array, rtol: float = 1e-6) -> Array:
    """``bool[n]``: which blocks of ``A`` (``[n, b, b]``, or ``[P, P]`` as one block) have an eigenvalue below
    ``−rtol·`` their mean diagonal, by a Cholesky factorisation (an order of magnitude cheaper than the
    eigendecomposition :func:`clip_blocks` then spends on those blocks only). The shift also passes singular PSD
    blocks (a leaf's last block is padded with zeros)."""
    m = matrix.reshape(-1, *matrix.shape[-2:])
    sym = 0.5 * (m + jnp.swapaxes(m, -1, -2))
    scale = jnp.abs(jnp.trace(sym, axis1=-2, axis2=-1)) / m.shape[-1] + jnp.finfo(m.dtype).tiny
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)
    chol = jnp.linalg.cholesky(sym + (rtol * scale)[:, None, None] * eye[None])
    return ~jnp.all(jnp.isfinite(chol), axis=(-2, -1))


def clip_blocks(matrix: Array, index: Array, valid: Array) -> tuple[Array, Array]:
    """``(A₊, clipped)``: :func:`clip_to_psd` applied to the blocks ``index`` only (``valid`` False marks padding
    entries of ``index``, which repeat a real one); ``clipped`` is ``Σ|λ₋| / Σ|λ|`` over the whole matrix, the
    untouched blocks being PSD (their ``Σ|λ|`` is their trace)."""
    m = matrix.reshape(-1, *matrix.shape[-2:])
    sym = 0.5 * (m[index] + jnp.swapaxes(m[index], -1, -2))
    vals, vecs = jnp.linalg.eigh(sym)
    kept = jnp.maximum(vals, 0)
    weight = valid.astype(vals.dtype)[:, None]
    negative = jnp.sum(weight * jnp.abs(vals - kept))
    touched = jnp.zeros(m.shape[0], bool).at[index].set(True)
    rest = jnp.sum(jnp.where(touched, 0, jnp.trace(m, axis1=-2, axis2=-1)))
    total = jnp.sum(weight * jnp.abs(vals)) + rest
    out = m.at[index].set(jnp.einsum("...ij,...j,...kj->...ik", vecs, kept, vecs))
    return out.reshape(matrix.shape), negative / jnp.maximum(total, jnp.finfo(vals.dtype).tiny)


def nbytes(curv: Curvature) -> int:
    """Bytes the curvature object holds."""
    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(curv)))


__all__ = ["GUARD_MESSAGE", "KINDS", "STRUCTURES", "Curvature", "Layout", "clip_blocks", "clip_to_psd", "downdate",
           "example_loss", "indefinite_blocks", "layout", "nbytes", "rows", "sherman_morrison_downdate",
           "sherman_morrison_inverse", "sherman_morrison_update", "solve", "term_sum", "trace_sum", "weighted_loss_sum"]
