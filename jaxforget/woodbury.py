r"""Direct solvers for regularised least squares: SPD factorisations and exact removal of rows (Woodbury / Schur).

The problem is the one of :mod:`jaxforget.solvers`: per-sample Jacobian rows ``J_i`` (``[K, P]``), targets
``t_i`` and a ridge ``λ > 0``,

.. math::  \min_w\ \tfrac12 \sum_{i \in R} \lVert J_i w - t_i \rVert^2 + \tfrac12 \lambda \lVert w \rVert^2 ,

held explicitly in one of two spaces:

* **rows** (primal space, ``P × P``): ``A = JᵀJ + λI`` held as its explicit inverse, and the removed samples'
  Jacobian rows ``J_F`` with their targets ``t_F``. :func:`primal_remove_rows` applies Woodbury;
  :class:`PrimalRunningInverse` / :func:`extend_primal_inverse` keep a stream's running ``A_R⁻¹`` and update it
  with each request's own rows, in fixed-size blocks.
* **Gram** (dual space, ``N × N`` with ``N = n·K``): ``M = JJᵀ + λI`` factorised once (Cholesky factor or
  explicit inverse) and the rows ``M⁻¹[F, :]`` of the removed rows. :func:`dual_remove_rows` is the exact Schur
  complement solve; :class:`DualRowBuffer` / :func:`extend_dual_rows` keep a stream's removal rows in a
  fixed-width buffer (one compiled shape per stream).

The stream states are plain dataclasses passed in and out: nothing here holds hidden state, and replaying a
ledger's requests one by one through the same functions reproduces a stream's state exactly. The matrix-free
solvers (Newton-CG, refinement, Nyström) live in :mod:`jaxforget.solvers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget import errors

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


def add_ridge(gram: Array, ridge: Array | float) -> Array:
    """``gram + ridge·I``.

    Examples:
      >>> add_ridge(jnp.ones((2, 2)), 0.5).tolist()
      [[1.5, 1.0], [1.0, 1.5]]
    """
    return gram + ridge * jnp.eye(gram.shape[0], dtype=gram.dtype)


def spd_cholesky(matrix: Array) -> Array:
    r"""Lower Cholesky factor ``L`` (``LLᵀ = matrix``) of a symmetric positive-definite matrix.

    A matrix that is not numerically positive definite comes back with NaNs (callers check).

    Examples:
      >>> spd_cholesky(jnp.array([[4.0, 2.0], [2.0, 2.0]])).tolist()
      [[2.0, 0.0], [1.0, 1.0]]
    """
    return jnp.linalg.cholesky(matrix)


def cholesky_solve(chol: Array, rhs: Array) -> Array:
    """``(LLᵀ)⁻¹ rhs`` for ``rhs: [m]`` or ``[m, k]`` by two triangular solves (``2m²k`` flops).

    Examples:
      >>> cholesky_solve(jnp.array([[2.0, 0.0], [1.0, 1.0]]), jnp.array([4.0, 2.0])).tolist()
      [1.0, 0.0]
    """
    return jax.scipy.linalg.cho_solve((chol, True), rhs)


def cholesky_inverse(chol: Array) -> Array:
    r"""The explicit inverse :math:`(LL^\top)^{-1}` of an SPD matrix from its lower Cholesky factor ``L``.

    On CPU LAPACK's ``potri`` (``~2m³/3`` flops, in place on a host copy, placed back with an explicit
    ``device_put``); elsewhere two triangular solves against the identity (``2m³`` flops, but at accelerator
    speed and without a host round trip).

    Raises:
      DirectSolveError: LAPACK reports a singular factor.

    Examples:
      >>> cholesky_inverse(jnp.array([[2.0, 0.0], [1.0, 1.0]])).tolist()  # L Lᵀ = [[4, 2], [2, 2]]
      [[0.5, -0.5], [-0.5, 1.0]]
    """
    if jax.default_backend() != "cpu":
        return _identity_solve(chol)
    from scipy.linalg import lapack  # pylint: disable=import-outside-toplevel

    inv, info = lapack.dpotri(np.array(chol, np.float64, order="F"), lower=1, overwrite_c=1)
    if info != 0:
        raise errors.DirectSolveError(f"LAPACK potri failed (info={info}) on a {inv.shape[0]}² Cholesky factor.")
    return jax.device_put(np.tril(inv) + np.tril(inv, -1).T)  # potri fills the lower triangle only


@jax.jit
def _identity_solve(chol: Array) -> Array:
    return cholesky_solve(chol, jnp.eye(chol.shape[0], dtype=chol.dtype))


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
    (``M⁻¹`` is symmetric: its rows are its columns; :class:`DualRowBuffer` keeps them across requests).

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
    request's new rows only (:func:`extend_primal_inverse`). When ``|F| > P`` the ``P × P`` form
    :math:`(I - U J_F)^{-1} A^{-1}` is cheaper (:math:`O(P^2|F| + P^3)`). Zero rows (padding) are identity
    rows of ``S``: they change nothing.

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


# --------------------------------------------------------------------------------------------------
# Stream state: what a sequence of removals from one factorisation carries between requests
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DualRowBuffer:
    """The dual path's removal rows ``M⁻¹[slots, :]`` in a fixed-width buffer (one compiled shape per stream).

    Attributes:
      slots: ``int64[width]`` row index held by each slot; the first ``count`` are valid, in the order the rows
        were removed.
      count: valid slots.
      rows: ``[width, N]`` device buffer (``None`` before the first request); rows past ``count`` are ignored.
    """

    slots: np.ndarray
    count: int
    rows: Array | None

    @classmethod
    def empty(cls, spare: Array | None = None) -> DualRowBuffer:
        """No rows yet; ``spare`` is a buffer whose memory may be reused (its contents are ignored)."""
        return cls(slots=np.zeros(0, np.int64), count=0, rows=spare)

    @property
    def valid(self) -> np.ndarray:
        """``bool[width]``: which slots hold a row."""
        return np.arange(self.slots.size) < self.count


def extend_dual_rows(
    buffer: DualRowBuffer,
    rows: np.ndarray,
    width: int,
    *,
    fetch: Callable[[np.ndarray, int], Array],
    write: Callable[[Array, Array, np.ndarray], Array],
    zeros: Callable[[tuple[int, int]], Array],
    num_cols: int,
    min_bucket: int = 1,
) -> DualRowBuffer:
    """``buffer`` holding the rows ``rows`` (host ints), producing only those it does not hold yet.

    Earlier rows are kept in their slots; new rows are fetched in a padded block whose size is a power of two
    (at least ``min_bucket``: ``O(log)`` compiled shapes) and written into the next free slots. A buffer of
    another width, or one that does not hold a subset of ``rows``, starts over (its memory is reused when the
    shape fits). The given buffer's device array is consumed (``write`` may donate it).

    Args:
      buffer: the stream's buffer so far.
      rows: every row the removal needs (the union over the stream's requests).
      width: slots of the buffer (sized for the stream; at least ``rows.size``).
      fetch: ``(index [bucket], m) ↦ M⁻¹[index, :]`` (``[bucket, N]``): the first ``m`` entries of ``index`` are
        the new rows, the others padding (0; their fetched rows are dropped).
      write: ``(rows, fresh, target) ↦ rows`` with ``rows[target[j]] = fresh[j]`` (out-of-range targets dropped).
      zeros: ``shape ↦`` a zero device buffer of that shape.
      num_cols: ``N``.
      min_bucket: smallest fetch block.

    Returns:
      The new buffer.

    Examples:
      >>> inv = jnp.arange(12.0).reshape(4, 3)  # stands for M⁻¹ rows
      >>> put = lambda buf, fresh, target: buf.at[jnp.asarray(target)].set(fresh, mode="drop")
      >>> kw = dict(fetch=lambda i, m: inv[jnp.asarray(i)], write=put, zeros=jnp.zeros, num_cols=3)
      >>> b = extend_dual_rows(DualRowBuffer.empty(), np.array([2]), 4, **kw)
      >>> b = extend_dual_rows(b, np.array([0, 2]), 4, **kw)
      >>> b.slots[: b.count].tolist(), b.rows[: b.count].tolist()
      ([2, 0], [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]])
    """
    slots, count, buf = buffer.slots, buffer.count, buffer.rows
    if buf is None or buf.shape != (width, num_cols):
        buf = zeros((width, num_cols))
        slots, count = np.zeros(width, np.int64), 0
    elif slots.size != width or not np.isin(slots[:count], rows).all():
        slots, count = np.zeros(width, np.int64), 0  # the memory is reused; every row is produced again
    new_rows = np.setdiff1d(rows, slots[:count])
    if new_rows.size:
        bucket = 1 << int(np.ceil(np.log2(max(new_rows.size, min_bucket))))
        index = np.zeros(bucket, np.int64)
        index[: new_rows.size] = new_rows
        target = np.full(bucket, width, np.int64)  # out of range: the padding rows are dropped
        target[: new_rows.size] = count + np.arange(new_rows.size)
        buf = write(buf, fetch(index, new_rows.size), target)
        slots = slots.copy()
        slots[count : count + new_rows.size] = new_rows
        count += new_rows.size
    return DualRowBuffer(slots=slots, count=count, rows=buf)


@dataclasses.dataclass(frozen=True)
class PrimalRunningInverse:
    """The primal path's running inverse of the retained system.

    Attributes:
      removed: ``int64`` sample positions folded in so far (in the order they were removed).
      inverse: ``[P, P]`` :math:`A_R^{-1}`.
      rhs: ``[P]`` :math:`b_R`.
      blocks: the removed samples' Jacobian rows not yet folded into ``gram``, one ``[block·K, P]`` array per block
        (padding rows zero), kept only when the caller checks requests from them (else empty).
      gram: ``[P, P]`` the system with the folded blocks' rows taken off, ``A − Σ J_bᵀJ_b``; ``None`` while
        nothing is folded (the caller's full-data ``A``).
    """

    removed: np.ndarray
    inverse: Array
    rhs: Array
    blocks: tuple[Array, ...] = ()
    gram: Array | None = None


def extend_primal_inverse(
    state: PrimalRunningInverse,
    new: np.ndarray,
    *,
    block_size: int,
    remove_block: Callable[[Array, Array, np.ndarray, np.ndarray], tuple[Array, Array, Array]],
    keep_rows: bool,
    fold: Callable[[Array | None, Array], Array] | None = None,
    max_rows: int = 0,
) -> PrimalRunningInverse:
    """Folds the samples ``new`` (host positions) into the running inverse, ``block_size`` samples at a time.

    Every block has the same shape (the last one padded, its padding marked invalid), so a stream compiles one
    update whatever its request sizes. The given state's inverse is consumed (``remove_block`` may donate it).

    Args:
      state: the running inverse so far.
      new: positions to remove now (none of them in ``state.removed``).
      block_size: samples per block.
      remove_block: ``(inv, rhs, positions [block_size], valid [block_size]) ↦ (inv_R, rhs_R, rows)``, e.g.
        :func:`primal_remove_rows` on the block's Jacobian rows.
      keep_rows: keep each block's ``rows`` in the state (for a check that needs the removed rows).
      fold: ``(gram or None, rows) ↦ gram − rowsᵀrows`` (``None``: the caller's full-data ``A``). With it, once the
        held blocks reach ``max_rows`` rows they are folded into ``gram`` and dropped, so the held rows, and a
        check's cost over them, stay bounded however long the stream (one ``P × P`` more, at ``P²`` flops per
        folded row: the order of the update itself).
      max_rows: the held rows that trigger a fold (e.g. ``P``).

    Returns:
      The new state.

    Examples:
      >>> j = jnp.array([[1., 0.], [0., 2.], [1., 1.]]); t = jnp.array([1., 2., 3.])
      >>> def remove(inv, rhs, pos, valid):
      ...     rows = j[jnp.asarray(pos)] * jnp.asarray(valid, jnp.float32)[:, None]
      ...     return (*primal_remove_rows(inv, rhs, rows, t[jnp.asarray(pos)] * jnp.asarray(valid, jnp.float32)), rows)
      >>> a = j.T @ j + 0.5 * jnp.eye(2)
      >>> s = PrimalRunningInverse(np.zeros(0, np.int64), jnp.linalg.inv(a), j.T @ t)
      >>> s = extend_primal_inverse(s, np.array([2]), block_size=2, remove_block=remove, keep_rows=False)
      >>> s.removed.tolist(), bool(jnp.allclose(s.inverse, jnp.linalg.inv(a - j[2:].T @ j[2:]), atol=1e-5))
      ([2], True)
    """
    inv, rhs, blocks, gram = state.inverse, state.rhs, state.blocks, state.gram
    new = np.asarray(new, np.int64)
    for lo in range(0, new.size, block_size):
        part = new[lo : lo + block_size]
        positions = np.pad(part, (0, block_size - part.size), mode="edge")  # padding repeats a row, masked out
        valid = np.arange(block_size) < part.size
        inv, rhs, rows = remove_block(inv, rhs, positions, valid)
        if keep_rows:
            blocks = (*blocks, rows)
        if fold is not None and sum(b.shape[0] for b in blocks) >= max_rows:
            for block in blocks:
                gram = fold(gram, block)
            blocks = ()
    return PrimalRunningInverse(removed=np.concatenate([state.removed, new]), inverse=inv, rhs=rhs, blocks=blocks,
                                gram=gram)


__all__ = [
    "DualRowBuffer", "PrimalRunningInverse", "add_ridge", "cholesky_inverse", "cholesky_solve", "dual_remove_rows",
    "extend_dual_rows", "extend_primal_inverse", "primal_remove_rows", "spd_cholesky",
]
