r"""The direct forget path: factorise the full-data system once, remove each request's rows exactly.

With the fixed normaliser (``regularization="fixed"``, ridge ``λ = n·μ`` in sum form) a request is a low-rank
change of the normal equations, so the retained minimiser follows from one factorisation of the full-data system
in the smaller of two spaces (:func:`choose_solver`):

* **primal** ``A = JᵀJ + λI`` (``P × P``), held as its explicit inverse; a stream keeps a running ``A_R⁻¹``
  updated by Woodbury with each request's own Jacobian rows (:func:`jaxforget.woodbury.primal_remove_rows`);
* **dual** ``M = JJᵀ + λI`` (``N × N``, ``N = n·K``), held as its Cholesky factor or explicit inverse; a stream
  keeps the rows ``M⁻¹[F, :]`` of the removed rows, and a request is a Schur-complement solve
  (:func:`jaxforget.woodbury.dual_remove_rows`) and one ``Jᵀα`` pass.

Each request's result is checked (the relative residual ``‖g_r(w)‖/‖g_r(w_old)‖`` of the retained problem) and
refined with the same factor when it misses ``tol``.

The stream state (:class:`DirectStream`) is an explicit value: :func:`advance_stream` folds a ledger's requests
into it one by one, in request order, and :func:`direct_solve` reads it. Replaying a ledger from the empty stream
therefore reproduces, bit for bit, the state a live stream reached request by request.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxforget import compat, errors, ledger, progress, solvers, woodbury
from jaxforget import mesh as mesh_lib
from jaxforget.methods.mixed_linear.problem import LinearizedProblem, highest

PyTree = Any

#: Samples per block of the primal path's Woodbury update (one compiled shape for every request size).
PRIMAL_BLOCK = 16
# The gram check folds its held removed rows into the stream's own A_R once they reach this many per parameter:
# folding h rows costs ~2hP² flops, holding them ~4hP per later check and 8hP bytes, so folding pays off only over
# many later requests (a soak, not one large request) and the held rows stay within a few P×P matrices.
FOLD_ROWS_PER_PARAM = 4


@dataclasses.dataclass(frozen=True)
class SolverChoice:
    """Which exact solver serves the forget requests, and why (written into every report).

    Attributes:
      path: ``"direct-primal"``, ``"direct-dual"``, ``"cg"`` or ``"sgd"``.
      reason: one sentence.
      num_params: ``P``, linearized parameters.
      num_rows: ``N = n·K``, rows of the least-squares problem (training samples × outputs).
      direct_max_size: the size limit that ``"auto"`` applied to ``min(P, N)``.
      factor_bytes: memory of the factorised matrix and its inverse (direct paths), else 0.
    """

    path: str
    reason: str
    num_params: int
    num_rows: int
    direct_max_size: int
    factor_bytes: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DirectFactor:
    """The factorised full-data system of the direct path (float64; built once per core).

    ``space="primal"``: ``inverse`` is ``A⁻¹ = (JᵀJ + λI)⁻¹`` (``[P, P]``, always held explicitly: requests
    update a running copy by Woodbury), ``solution = w_D`` and ``targets = b = Jᵀt`` (``[P]``); ``chol`` is
    ``None``; ``gram`` is ``A`` itself when requests are checked from it (``check="gram"``, see
    ``config.direct_check``), else ``None``.
    ``space="dual"``: ``chol`` factors ``M = JJᵀ + λI`` (``[N, N]``), ``solution = α_D = M⁻¹t`` and
    ``targets = t`` (``[N]``), with ``λ = n·μ`` and ``t_i = α y_i − f_c(x_i)``. With ``config.direct_inverse``
    it holds the explicit ``M⁻¹`` in ``inverse`` instead (``chol`` is ``None``, so that one ``N × N``
    matrix is held), and a request's removal rows are a gather.
    """

    space: str
    chol: jax.Array | None
    solution: jax.Array
    targets: jax.Array | None
    ridge: float
    build_seconds: float
    inverse: jax.Array | None = None
    inverse_seconds: float = 0.0
    gram: jax.Array | None = None  # primal, ``direct_check="gram"``: ``A`` itself (``[P, P]``)
    check: str = "data"  # how a request is checked (primal: "gram" or "data"; dual: the dual residual)

    @property
    def size(self) -> int:
        """Rows of the factorised matrix (``P`` primal, ``N`` dual)."""
        return int(self.solution.shape[0])

    @property
    def matrix(self) -> jax.Array:
        """What solves against ``M``: the explicit inverse, else the Cholesky factor."""
        return self.inverse if self.inverse is not None else self.chol


@dataclasses.dataclass(frozen=True)
class DirectStream:
    """The direct path's stream state after serving the requests of a ledger.

    Its contents change results at rounding level (a running Woodbury update differs from one of the full-data
    inverse in the last bits), so it is only ever produced by :func:`advance_stream`, request by request.

    Attributes:
      served: ``int32[n_train]`` the ledger (``removed_by``) whose requests are folded in.
      dual: the dual path's removal rows, else ``None``.
      primal: the primal path's running inverse, else ``None``.
    """

    served: np.ndarray
    dual: woodbury.DualRowBuffer | None = None
    primal: woodbury.PrimalRunningInverse | None = None

    def arrays(self) -> list:
        """Device arrays held (memory accounting)."""
        if self.dual is not None:
            return [self.dual.rows]
        gram = [] if self.primal.gram is None else [self.primal.gram]
        return [self.primal.inverse, self.primal.rhs, *self.primal.blocks, *gram]


@dataclasses.dataclass(frozen=True)
class DirectResult:
    """One direct solve: float64 weights, ``‖g_r(w)‖/‖g_r(w_old)‖``, ``‖g_r(w_old)‖`` and data passes made."""

    w: PyTree
    rel_residual: float
    grad_norm: float
    passes: float


class DirectKernels:
    """The direct path's jitted kernels on one :class:`LinearizedProblem` (every argument a device array)."""

    def __init__(self, problem: LinearizedProblem):
        self.problem = problem
        pb = problem
        hi = jax.lax.Precision.HIGHEST

        def dual_check(lin, fix, x, alpha, targets, retained, ridge, count, lin32, fix32, x32):
            """``w = J_Rᵀα``, the dual residual ``r = t − J w − λα`` (zero off the retained rows) and
            ``‖g_r(w)‖`` from the identity ``g_r(J_Rᵀα) = −(1/n) J_Rᵀ r`` (fixed ridge ``λ = n·μ``).

            ``w`` and ``r`` are float64; the map ``J_Rᵀ r`` of the (already small) residual runs in float32: it
            reads ``‖g_r‖`` to well within a float32 relative error, at a fraction of a float64 pass.
            """
            alpha = alpha * retained  # exactly J_Rᵀα: the removal leaves rounding-level values on F
            w = pb.jt_apply(lin, fix, x, alpha)
            jw = pb.j_apply(lin, fix, x, w)[: pb.num_train].reshape(-1)
            r = (targets - jw - ridge * alpha) * retained
            g = pb.jt_apply(lin32, fix32, x32, r.astype(x32.dtype))
            return alpha, w, r, optax.tree.norm(g).astype(count.dtype) / count

        def dual_request(inv_rows, solution, targets, rows, valid, num_valid, retained, ridge, count, lin, fix, x,
                         lin32, fix32, x32, t32, c32, w_old):
            """A dual forget request on device in one call: the removal of ``rows``, its check (``dual_check``)
            and the normaliser ``‖g_r(w_old)‖`` (a float32 gradient pass).

            Returns:
              ``(α_R, w, r, ‖g_r(w)‖, ‖g_r(w_old)‖)``.
            """
            alpha = woodbury.dual_remove_rows(inv_rows, solution, targets[rows], rows, valid, num_valid)
            g_old, _ = pb.gradient(lin32, fix32, w_old, x32, t32, c32, count.astype(x32.dtype))
            return *dual_check(lin, fix, x, alpha, targets, retained, ridge, count, lin32, fix32, x32), \
                optax.tree.norm(g_old)

        def dual_refine(explicit, matrix, inv_rows, alpha, r, rows, valid, num_valid, targets, retained, ridge,
                        count, lin, fix, x, lin32, fix32, x32):
            """One refinement: the dual residual on the retained rows, corrected with the same factor and removal
            rows, then checked again."""
            solved = jnp.matmul(matrix, r, precision=hi) if explicit else woodbury.cholesky_solve(matrix, r)
            alpha = alpha + woodbury.dual_remove_rows(inv_rows, solved, r[rows], rows, valid, num_valid)
            return dual_check(lin, fix, x, alpha, targets, retained, ridge, count, lin32, fix32, x32)

        def primal_remove(lin, fix, inv, rhs, x_f, t_f, valid):
            """Removes the samples ``x_f`` (``valid`` False on padding) from ``(A⁻¹, b)``; also their rows."""
            rows, resid = pb.jacobian_rows(lin, fix, x_f, t_f, valid)
            return (*woodbury.primal_remove_rows(inv, rhs, rows, resid), rows)

        def gram_gradients(gram, rhs, ws, count):
            """``(A w − b_R)/n`` at the columns of ``ws`` (``[P, m]``): the retained gradient once the removed rows'
            ``J_FᵀJ_F w / n`` is taken off (``remove_rows_gradients``, a block of rows at a time)."""
            return (jnp.matmul(gram, ws, precision=hi) - rhs[:, None]) / count

        def remove_rows_gradients(gs, rows, ws, count):
            return gs - jnp.matmul(rows.T, jnp.matmul(rows, ws, precision=hi), precision=hi) / count

        def fold_rows(gram, rows):
            return gram - jnp.matmul(rows.T, rows, precision=hi)

        def gram_correct(inv, gs, w, count):
            """Primal residual ``b_r − A_r w = −n·g_r(w)`` (sum units), corrected with the running inverse."""
            return w + jnp.matmul(inv, -count * gs[:, 0], precision=hi)

        def data_correct(inv, g, w, count):
            flat, unravel = ravel_pytree(w)
            return unravel(flat + jnp.matmul(inv, -count * ravel_pytree(g)[0], precision=hi))

        self.dual_check = jax.jit(highest(dual_check))
        self.dual_request = jax.jit(highest(dual_request))
        self.dual_refine = jax.jit(highest(dual_refine), static_argnums=0)
        self.spd_cholesky = jax.jit(highest(lambda gram, ridge: woodbury.spd_cholesky(woodbury.add_ridge(gram, ridge))))
        self.add_ridge = jax.jit(woodbury.add_ridge)
        self.cholesky_solve = jax.jit(highest(woodbury.cholesky_solve))
        # The reference solve (oracle) compiles its own copy: its reduced sizes change with every request.
        self.ref_cholesky_solve = jax.jit(highest(woodbury.cholesky_solve))
        self.inverse_times = jax.jit(lambda inv, rhs: jnp.matmul(inv, rhs, precision=hi))
        # The running inverse is updated in place (donated): a request costs no P×P copy.
        self.primal_remove = jax.jit(highest(primal_remove), donate_argnums=2)
        self.gram_gradients = jax.jit(highest(gram_gradients))
        self.remove_rows_gradients = jax.jit(highest(remove_rows_gradients))
        # The first fold reads the factor's A (kept); later ones update the stream's own copy in place.
        self.fold_rows = jax.jit(highest(fold_rows))
        self.fold_rows_in_place = jax.jit(highest(fold_rows), donate_argnums=0)
        self.gram_correct = jax.jit(highest(gram_correct))
        self.data_correct = jax.jit(highest(data_correct))
        self.copy = jax.jit(lambda a: a + 0)
        # M⁻¹ is symmetric: its removal columns are gathered as contiguous rows (faster than a strided column
        # gather), and written in place (the donated buffer is not copied).
        self.gather_rows = jax.jit(lambda sym, rows: sym[rows])
        self.write_rows = jax.jit(lambda buf, new, slots: buf.at[slots].set(new, mode="drop"), donate_argnums=0)
        self.zeros = jax.jit(lambda shape: jnp.zeros(shape, jnp.float64), static_argnums=0,
                             out_shardings=problem.sharding)
        self.dual_targets = jax.jit(lambda t_full: t_full[: problem.num_train].reshape(-1))


# --------------------------------------------------------------------------------------------------
# Choosing the path and factorising
# --------------------------------------------------------------------------------------------------


def choose_solver(config: ml_collections.ConfigDict, num_params: int, num_rows: int) -> SolverChoice:
    """The solver path for a problem of ``P = num_params``, ``N = num_rows`` (``config.solver`` resolved).

    Direct works in the smaller space: primal ``JᵀJ + λI`` (``P × P``) when ``P ≤ N``, else dual
    ``JJᵀ + λI`` (``N × N``). ``"auto"`` takes it when ``min(P, N) ≤ direct_max_size`` and the normaliser is
    fixed; otherwise matrix-free CG (preconditioned if configured).
    """
    limit = int(config.get("direct_max_size", 0)) or (20_000 if jax.default_backend() == "cpu" else 40_000)
    size, space = min(num_params, num_rows), ("primal" if num_params <= num_rows else "dual")
    forced = config.get("direct_space", "auto")
    if forced in ("primal", "dual"):
        size, space = (num_params if forced == "primal" else num_rows), forced
    elif forced != "auto":
        raise errors.ConfigError(f"direct_space must be 'auto', 'primal' or 'dual', got {forced!r}.")
    factor_bytes = 2 * size * size * 8
    if config.solver in ("cg", "sgd"):
        return SolverChoice(config.solver, "config.solver", num_params, num_rows, limit, 0)
    if config.solver == "direct":
        return SolverChoice(f"direct-{space}", "config.solver", num_params, num_rows, limit, factor_bytes)
    if config.get("regularization", "fixed") != "fixed":
        reason = "regularization='retained' shifts every row's ridge per request: not a low-rank change"
        return SolverChoice("cg", reason, num_params, num_rows, limit, 0)
    if size > limit:
        return SolverChoice("cg", f"min(P, N) = {size} > direct_max_size = {limit}", num_params, num_rows, limit, 0)
    reason = f"min(P={num_params}, N={num_rows}) = {size} <= direct_max_size = {limit}"
    return SolverChoice(f"direct-{space}", reason, num_params, num_rows, limit, factor_bytes)


def wants_inverse(config: ml_collections.ConfigDict, size: int, planned_rows: int) -> bool:
    """Whether the dual path holds ``M⁻¹`` explicitly (``config.direct_inverse``; ``"auto"``: on accelerators,
    and on CPU when the planned stream removes more than a third of the ``size`` rows)."""
    mode = config.get("direct_inverse", "auto")
    if mode not in ("auto", "always", "never"):
        raise errors.ConfigError(f"direct_inverse must be 'auto', 'always' or 'never', got {mode!r}.")
    if mode != "auto":
        return mode == "always"
    return jax.default_backend() != "cpu" or 3 * planned_rows > size


def build_factor(pb: LinearizedProblem, kern: DirectKernels, core: PyTree, choice: SolverChoice,
                 config: ml_collections.ConfigDict, *, planned_rows: int, check: str | None = None) -> DirectFactor:
    """Builds the float64 factorisation of the full-data system in ``choice``'s space.

    ``check`` (``"gram"``/``"data"``) pins how the primal path checks requests; by default
    ``config.direct_check`` (``"auto"``: by timing, :func:`primal_check`).

    Primal: ``A = Σ_i J_iᵀJ_i + λI`` from per-example Jacobians, summed data-parallel, then inverted (``A⁻¹``).
    Dual: ``G = JJᵀ + λI`` built a block of columns at a time (``J J_Aᵀ`` by vmapped JVPs over the data, never
    ``J`` for the whole set), factorised, and inverted when :func:`wants_inverse`. ``λ = n·μ``.

    Raises:
      DirectSolveError: the matrix is not numerically positive definite.
    """
    space = choice.path.removeprefix("direct-")
    if space not in ("primal", "dual"):  # a CG/SGD config asked for the direct solution (e.g. as a reference)
        space = "primal" if choice.num_params <= choice.num_rows else "dual"
    ridge = float(config.mu) * pb.num_train
    start = time.perf_counter()
    with compat.enable_x64(), compat.host_blas_threads(None):  # a one-off factorisation: every core
        lin, fix = pb.split_as(core, jnp.float64)
        x, t = pb.data(jnp.float64)
        c = pb.row_weights(np.ones(pb.num_train, bool), jnp.float64)
        if space == "primal":
            keep_gram = (check or config.get("direct_check", "auto")) != "data"
            chol, solution, targets, gram = primal_factor(pb, kern, lin, fix, x, t, c, ridge, keep_gram=keep_gram)
        else:
            (chol, solution, targets), gram = dual_factor(pb, kern, lin, fix, x, t, ridge), None
        jax.block_until_ready(solution)
    if not bool(np.all(np.isfinite(np.asarray(solution)))):
        raise errors.DirectSolveError(
            f"The {space} Gram matrix ({chol.shape[0]} x {chol.shape[0]}, ridge λ = n·μ = {ridge:.3g}) is "
            "not numerically positive definite in float64; increase mu or use solver='cg'.")
    build_seconds = time.perf_counter() - start
    inverse, inverse_seconds = None, 0.0
    if space == "primal" or wants_inverse(config, chol.shape[0], planned_rows):
        start = time.perf_counter()
        with compat.enable_x64(), compat.host_blas_threads(None):
            inverse = jax.block_until_ready(pb.replicate(woodbury.cholesky_inverse(chol)))
        chol, inverse_seconds = None, time.perf_counter() - start
    if space == "dual":
        check = "dual"
    elif check is None:
        check = primal_check(pb, kern, core, config, gram, solution, targets)
    if check == "gram":  # compiled with the build: a long stream's first fold happens inside a timed request
        with compat.enable_x64():
            rows = pb.replicate(np.zeros((pb.num_classes * PRIMAL_BLOCK, gram.shape[0]), np.float64))
            jax.block_until_ready(kern.fold_rows_in_place(kern.fold_rows(gram, rows), rows))
    return DirectFactor(space, chol, solution, targets, ridge, build_seconds, inverse, inverse_seconds,
                        gram if check == "gram" else None, check)


def primal_factor(pb: LinearizedProblem, kern: DirectKernels, lin, fix, x, t, c, ridge: float, solve=None,
                  keep_gram: bool = False) -> tuple:
    """``(L, w, b, A)``: the Cholesky factor of ``A = Σ_i c_i J_iᵀJ_i + ridge·I``, the ravelled solution
    ``w = A⁻¹b``, the right-hand side ``b = Σ_i c_i J_iᵀ t_i`` and ``A`` itself if ``keep_gram`` (else ``None``)
    (float64, call under x64)."""
    gram, rhs = pb.primal_gram((lin, fix), (x, t, c))
    ridge = pb.scalar(ridge, jnp.float64)
    chol = kern.spd_cholesky(gram, ridge)
    gram = kern.add_ridge(gram, ridge) if keep_gram else None
    return chol, (solve or kern.cholesky_solve)(chol, rhs), rhs, gram


def primal_check(pb: LinearizedProblem, kern: DirectKernels, core: PyTree, config: ml_collections.ConfigDict,
                 gram: jax.Array, solution: jax.Array, rhs: jax.Array) -> str:
    """``config.direct_check`` for the primal path; ``"auto"`` times one check of each kind (after compiling
    both) at the full-data solution and keeps the faster."""
    mode = config.get("direct_check", "auto")
    if mode != "auto":
        return mode
    nothing = np.zeros(pb.num_train, np.int32)
    with compat.enable_x64():
        lin, fix, x, t, c, count = pb.float64(core, nothing)
        w = pb.unravel(solution, lin)
        ws = jnp.stack([solution, solution], axis=1)
        rows = pb.replicate(np.zeros((pb.num_classes * PRIMAL_BLOCK, solution.shape[0]), np.float64))
        lin32, fix32, x32, t32, c32, count32 = pb.float32(core, nothing)
        w32 = pb.replicate(optax.tree.cast(w, jnp.float32))
        # Per request: one product with A and one per block of removed rows (one block timed here), against
        # the data path's gradients at w_old (float32) and at w (float64).
        checks = {"gram": lambda: kern.remove_rows_gradients(kern.gram_gradients(gram, rhs, ws, count), rows, ws,
                                                             count),
                  "data": lambda: (pb.gradient(lin32, fix32, w32, x32, t32, c32, count32)[0],
                                   pb.gradient(lin, fix, w, x, t, c, count)[0])}
        seconds = {}
        for name, fn in checks.items():
            jax.block_until_ready(fn())
            start = time.perf_counter()
            jax.block_until_ready(fn())
            seconds[name] = time.perf_counter() - start
    return min(seconds, key=seconds.get)


def dual_factor(pb: LinearizedProblem, kern: DirectKernels, lin, fix, x, t, ridge: float,
                keep: np.ndarray | None = None, solve=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(L, α, t)``: the Cholesky factor of ``JJᵀ + ridge·I`` over the rows ``keep`` (all by default), the
    solution ``α = (JJᵀ + ridge·I)⁻¹t`` and the targets ``t = αy − f_c`` of those rows (float64, under x64)."""
    gram = dual_gram(pb, lin, fix, x, keep=keep)
    targets = kern.dual_targets(pb.dual_targets(lin, fix, x, t))
    if keep is not None:
        targets = pb.replicate(np.asarray(targets)[keep])
    chol = kern.spd_cholesky(gram, pb.scalar(ridge, jnp.float64))
    del gram
    return chol, (solve or kern.cholesky_solve)(chol, targets), targets


def dual_gram(pb: LinearizedProblem, lin: PyTree, fix: PyTree, x: jax.Array, keep: np.ndarray | None = None
              ) -> jax.Array:
    """``JJᵀ`` (``[N, N]``, float64) over the training rows, ``direct_block`` samples of columns at a time.

    ``keep`` (``bool[N]``): only those rows and columns (computed in full, subset on the host)."""
    n, k = pb.num_train, pb.num_classes
    block = int(pb.config.get("direct_block", 32))
    gram = np.empty((n * k, n * k), np.float64)
    for lo in progress.track(range(0, n, block), desc="dual Gram"):
        idx = np.minimum(np.arange(lo, lo + block), n - 1)  # a fixed block shape: one compilation
        cols = np.asarray(pb.dual_gram_block(lin, fix, x, jax.device_put(np.asarray(pb.train_x[idx], np.float64))))
        width = (min(lo + block, n) - lo) * k
        gram[:, lo * k : lo * k + width] = cols[: n * k, :width]
    gram += gram.T  # the two triangles come from different JVPs: equal up to rounding
    gram *= 0.5
    if keep is not None:
        gram = gram[np.ix_(keep, keep)]
    return pb.replicate(gram)


def refactorised_solution(pb: LinearizedProblem, kern: DirectKernels, core: PyTree, removed_by, space: str
                          ) -> PyTree:
    """The float64 minimiser on the retained rows of ``removed_by`` from a fresh factorisation of the retained
    system in ``space`` (never a downdate): the primal ``Σ_{D_r} J_iᵀJ_i + λI`` or the dual ``J_r J_rᵀ + λI``
    over the retained rows only, then ``w = J_rᵀα``. Call under x64."""
    retained = ledger.retain_mask(removed_by)
    lin, fix, x, t, c, count = pb.float64(core, removed_by)
    ridge = float(count) * pb.mu
    if space == "primal":
        _, solution, _, _ = primal_factor(pb, kern, lin, fix, x, t, c, ridge, solve=kern.ref_cholesky_solve)
        return pb.unravel(solution, lin)
    _, solution, _ = dual_factor(pb, kern, lin, fix, x, t, ridge, keep=np.repeat(retained, pb.num_classes),
                                 solve=kern.ref_cholesky_solve)
    alpha = np.zeros((pb.num_padded, pb.num_classes), np.float64)
    alpha[: pb.num_train][retained] = np.asarray(solution).reshape(-1, pb.num_classes)
    coef = mesh_lib.shard_rows(alpha, pb.mesh, pb.num_padded // pb.mesh.size)
    return pb.ref_jt_sum((lin, fix), (x, coef))


# --------------------------------------------------------------------------------------------------
# The stream: fold requests into the removal state, then solve
# --------------------------------------------------------------------------------------------------


def start_stream(kern: DirectKernels, factor: DirectFactor, num_train: int, spare: jax.Array | None = None
                 ) -> DirectStream:
    """The stream before any request (``spare``: a dual buffer whose memory may be reused)."""
    served = np.zeros(num_train, np.int32)
    if factor.space == "dual":
        return DirectStream(served, dual=woodbury.DualRowBuffer.empty(spare))
    with compat.enable_x64():  # a float64 copy: the stream's updates consume (donate) it
        running = woodbury.PrimalRunningInverse(np.zeros(0, np.int64), kern.copy(factor.inverse), factor.targets)
    return DirectStream(served, primal=running)


def dual_width(num_removed: int, capacity: int) -> int:
    """Samples the dual buffer holds: the reserved capacity (one compilation for a planned stream), beyond it a
    power of two (at least 16 samples): an unplanned stream compiles ``O(log)`` times."""
    if num_removed <= capacity:
        return max(16, capacity)
    return max(16, 1 << int(np.ceil(np.log2(num_removed))))


def advance_stream(pb: LinearizedProblem, kern: DirectKernels, factor: DirectFactor, core: PyTree,
                   stream: DirectStream | None, removed_by, *, capacity: int = 0) -> DirectStream:
    """The stream after serving the requests of ``removed_by``, one request at a time in request order.

    Continues ``stream`` when the ledger it served is ``removed_by``'s first requests; otherwise (or with
    ``stream=None``) starts from the factor, so the result depends only on ``(factor, removed_by, capacity)``.
    Request ``k``'s samples are the positions with ``removed_by == k``. The given stream is consumed.
    """
    target = np.asarray(removed_by, np.int32)
    done = int(stream.served.max(initial=0)) if stream is not None else 0
    if stream is None or not np.array_equal(np.where(target <= done, target, 0), stream.served):
        spare = stream.dual.rows if stream is not None and stream.dual is not None else None
        stream, done = start_stream(kern, factor, pb.num_train, spare), 0
    with compat.enable_x64():
        lin, fix = pb.split_as(core, jnp.float64)
        for request in range(done + 1, int(target.max(initial=0)) + 1):
            positions = np.flatnonzero(target == request)
            if positions.size == 0:
                continue
            served = np.where(target <= request, target, 0).astype(np.int32)
            if factor.space == "dual":
                stream = DirectStream(served, dual=_extend_dual(pb, kern, factor, stream.dual, served, capacity))
            else:
                stream = DirectStream(served, primal=_extend_primal(pb, kern, factor, stream.primal, positions,
                                                                    lin, fix))
        if factor.space == "dual" and stream.dual.rows is None:  # no request yet: an empty buffer
            stream = DirectStream(stream.served, dual=_extend_dual(pb, kern, factor, stream.dual, stream.served,
                                                                   capacity))
    return stream


def _extend_dual(pb, kern, factor, buffer, served, capacity) -> woodbury.DualRowBuffer:
    k = pb.num_classes
    removed = np.flatnonzero(served > 0)
    rows = (removed[:, None] * k + np.arange(k)).reshape(-1)

    def fetch(index, num_new):
        if factor.inverse is not None:
            return kern.gather_rows(factor.inverse, pb.replicate(index))
        unit = np.zeros((factor.size, index.size), np.float64)
        unit[index[:num_new], np.arange(num_new)] = 1.0
        return kern.cholesky_solve(factor.chol, pb.replicate(unit)).T

    return woodbury.extend_dual_rows(buffer, rows, dual_width(removed.size, capacity) * k, fetch=fetch,
                                    write=lambda buf, fresh, target: kern.write_rows(buf, fresh, pb.replicate(target)),
                                    zeros=kern.zeros, num_cols=factor.size, min_bucket=k)


def _extend_primal(pb, kern, factor, running, positions, lin, fix) -> woodbury.PrimalRunningInverse:
    def remove_block(inv, rhs, block, valid):
        x_f = np.asarray(pb.train_x[block], np.float64)
        x_f, t_f, valid = pb.replicate((x_f, pb.targets_of(block), valid))
        return kern.primal_remove(lin, fix, inv, rhs, x_f, t_f, valid)

    def fold(gram, rows):
        with compat.enable_x64():
            return kern.fold_rows(factor.gram, rows) if gram is None else kern.fold_rows_in_place(gram, rows)

    # Held rows are folded into the stream's own A_R once they reach FOLD_ROWS_PER_PARAM · P: a request's check then
    # costs O(P²) however long the stream, and the held rows stay bounded.
    keep = factor.check == "gram"
    return woodbury.extend_primal_inverse(running, positions, block_size=PRIMAL_BLOCK, remove_block=remove_block,
                                         keep_rows=keep, fold=fold if keep else None,
                                         max_rows=FOLD_ROWS_PER_PARAM * int(factor.gram.shape[0]) if keep else 0)


def direct_solve(pb: LinearizedProblem, kern: DirectKernels, factor: DirectFactor, stream: DirectStream,
                 core: PyTree, w_old: PyTree, *, tol: float, max_refine: int, min_refine: int = 0) -> DirectResult:
    """The float64 minimiser on the retained rows of ``stream.served`` from the factor and the stream.

    The removal formula is applied, then checked: the relative residual ``‖g_r(w)‖/‖g_r(w_old)‖`` of the
    retained problem (primal: from the held ``A`` and the removed rows, no data pass, or by float64 gradient
    passes, per ``factor.check``; dual: the dual residual mapped to the primal gradient, see ``dual_check``).
    If it misses ``tol`` (ill-conditioned systems), up to ``max_refine`` steps of iterative refinement reuse the
    same factor on the residual (at least ``min_refine``, e.g. to compile them in a warm-up).
    """
    removed_by = stream.served
    # The normaliser ‖g_r(w_old)‖ is the request's own gradient, far above float32 rounding: a float32 pass
    # reads it well enough, and costs less than a float64 one.
    lin32, fix32, x32, t32, c32, count32 = pb.float32(core, removed_by)
    w_old32 = pb.replicate(optax.tree.cast(w_old, jnp.float32))
    refine = dict(tol=tol, max_steps=max_refine, min_steps=min_refine)
    with compat.enable_x64():
        lin, fix, x, t, c, count = pb.float64(core, removed_by)
        if factor.space == "dual":
            buf = stream.dual
            retained = np.repeat(ledger.retain_mask(removed_by), pb.num_classes).astype(np.float64)
            rows, valid, num_valid, retained = pb.replicate((buf.slots, buf.valid, np.int32(buf.count), retained))
            ridge = pb.scalar(factor.ridge, jnp.float64)
            *carry, g_old_norm = kern.dual_request(buf.rows, factor.solution, factor.targets, rows, valid, num_valid,
                                                   retained, ridge, count, lin, fix, x, lin32, fix32, x32, t32, c32,
                                                   w_old32)
            g_old_norm = max(float(g_old_norm), 1e-300)
            passes = [3.0]  # ‖g_r(w_old)‖, Jᵀα, and J w with J_Rᵀ r

            def check(carry):
                rel = float(carry[3]) / g_old_norm
                if rel > tol:  # the float32 map of r has a rounding floor: confirm a miss with a float64 pass
                    rel = float(pb.gradient_norm(lin, fix, carry[1], x, t, c, count)) / g_old_norm
                    passes[0] += 1.0
                return rel

            def correct(carry):
                passes[0] += 2.0
                return kern.dual_refine(factor.inverse is not None, factor.matrix, buf.rows, carry[0], carry[2],
                                        rows, valid, num_valid, factor.targets, retained, ridge, count, lin, fix, x,
                                        lin32, fix32, x32)

            carry, rel, _ = solvers.iterative_refinement(tuple(carry), check, correct, **refine)
            return DirectResult(carry[1], rel, g_old_norm, passes[0])
        running = stream.primal
        w = kern.inverse_times(running.inverse, running.rhs)
        if factor.check == "gram":
            # The quadratic's exact gradient from A, the removed rows and b_R: no pass over the data.
            w_old64 = pb.ravel(pb.replicate(optax.tree.cast(w_old, jnp.float64)))
            last = {}

            def check(w):
                ws = jnp.stack([w, w_old64], axis=1)
                gram = factor.gram if running.gram is None else running.gram
                gs = kern.gram_gradients(gram, running.rhs, ws, count)
                for block in running.blocks:
                    gs = kern.remove_rows_gradients(gs, block, ws, count)
                g_norm, g_old_norm = (float(v) for v in jax.device_get(jnp.linalg.norm(gs, axis=0)))
                last.update(gs=gs, g_old_norm=max(g_old_norm, 1e-300))
                return g_norm / last["g_old_norm"]

            w, rel, _ = solvers.iterative_refinement(
                w, check, lambda w: kern.gram_correct(running.inverse, last["gs"], w, count), **refine)
            return DirectResult(pb.unravel(w, lin), rel, last["g_old_norm"], 0.0)
        g_old_norm = max(float(pb.gradient_norm(lin32, fix32, w_old32, x32, t32, c32, count32)), 1e-300)
        last = {}

        def check(w):
            g, _ = pb.gradient(lin, fix, w, x, t, c, count)
            last["g"] = g
            return float(pb.norm(g)) / g_old_norm

        w, rel, steps = solvers.iterative_refinement(
            pb.unravel(w, lin), check, lambda w: kern.data_correct(running.inverse, last["g"], w, count), **refine)
        return DirectResult(w, rel, g_old_norm, 2.0 + steps)  # gradients at w_old and per check (no other pass)


__all__ = ["DirectFactor", "DirectKernels", "DirectResult", "DirectStream", "PRIMAL_BLOCK", "SolverChoice",
           "advance_stream", "build_factor", "choose_solver", "direct_solve", "refactorised_solution",
           "start_stream", "wants_inverse"]
