r"""The linearized least-squares problem of mixed-linear forgetting, laid out on a device mesh.

With the core network ``f_c`` split into a frozen part and the linearized parameters ``w_lin`` (``split``), the
user weights ``w_u`` enter the model only through ``f_c(x) + J(x) w_u`` with ``J = ∂f_c/∂w_lin`` at the core.
Over the training set ``D`` (targets ``t_i = α y_i``) and a retain mask ``c`` (1 retained, 0 removed or padding)

.. math::  L(w) = \frac{1}{2n}\sum_i c_i \lVert f_c(x_i) + J_i w - t_i \rVert^2 + \frac{\mu}{2}\lVert w\rVert^2 ,

with the normaliser ``n`` passed as ``count``. :class:`LinearizedProblem` holds the training data on the mesh
(padded rows weigh 0, so shapes never change between requests) and the jitted full-pass kernels every solver
uses: gradient, Gauss-Newton matvec, one Newton-CG step, the correction solve, the Nyström sketch, the largest
eigenvalue, the primal and dual Gram builders, ``J``/``Jᵀ`` applies, per-example Jacobian rows and prediction.
Every kernel takes device arrays only (scalars through :meth:`LinearizedProblem.scalar`): a request makes no
implicit host-to-device copy.

Caches here only save time and are keyed by content: the split (and its float64 copy) of the last core, keyed
by :func:`jaxforget.fingerprint.fingerprint`; the float64 copy of the training data.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxforget import data as data_lib
from jaxforget import fingerprint as fingerprint_lib
from jaxforget import kernels, ledger, models, solvers
from jaxforget import mesh as mesh_lib

PyTree = Any


def highest(fn):
    """Traces ``fn`` with float32 matmuls at full precision (no TF32/bf16 passes on GPU)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


class LinearizedProblem:
    """The mixed-linear least-squares problem of one model and training set on a mesh, with its kernels.

    Args:
      model: flax module, applied with ``train=False``.
      train_set: the training set ``D`` (``x: [n, H, W, C]``, ``y: [n]``).
      config: the method config (``linearize``, ``mu``, ``target_scale``, ``batch_size``, ``regularization``).
      mesh: data-parallel mesh.

    Attributes:
      x, t: ``[n_pad, ...]`` inputs and targets ``α·onehot(y)`` sharded on the mesh (float32).
      num_train, num_classes, num_padded, batch_size: sizes (``batch_size`` per device).
    """

    def __init__(self, model: nn.Module, train_set: data_lib.Dataset, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh):
        self.model, self.config, self.mesh = model, config, mesh
        self.num_train = len(train_set.ids)
        self.num_classes = int(train_set.num_classes)
        self.mu = float(config.mu)
        self.batch_size = int(min(config.batch_size, -(-self.num_train // mesh.size)))
        self.train_x, self.train_y = train_set.x, np.asarray(train_set.y)
        targets = config.target_scale * np.eye(self.num_classes, dtype=np.float32)[self.train_y]
        self.x, self.t = mesh_lib.shard_rows((train_set.x, targets), mesh, self.batch_size)
        self.num_padded = int(self.x.shape[0])
        self.sharding = NamedSharding(mesh, P())
        self._data64 = None
        self._split_cache: dict = {}
        self._fingerprint = fingerprint_lib.Memo()
        self._build_kernels()

    # ------------------------------------------------------------------ placement and content keys

    def replicate(self, tree: PyTree) -> PyTree:
        """Places a pytree replicated on the mesh (explicitly): the same sharding every call, so jit never retraces."""
        return mesh_lib.replicate(tree, self.mesh)

    def scalar(self, value, dtype) -> jax.Array:
        """A replicated device scalar of ``dtype`` (an explicit copy; float64 needs x64 enabled)."""
        return jax.device_put(np.asarray(value, np.dtype(jnp.dtype(dtype))), self.sharding)

    def fingerprint(self, core: PyTree) -> str:
        """:func:`jaxforget.fingerprint.fingerprint` of ``core``, remembered for the last core whose leaves are the
        same immutable arrays."""
        return self._fingerprint(core)

    def split(self, core: PyTree) -> tuple[PyTree, PyTree]:
        """``(lin, fix)``: the linearized parameter subtree and everything else (incl. batch_stats), replicated.

        Cached for the last core, by content (a request would otherwise pay a transfer per leaf).
        """
        key = self.fingerprint(core)
        if self._split_cache.get("key") != key:
            predicate = models.linearize_predicate(core["params"], self.config.linearize)
            lin, fix_params = kernels.split_params(core["params"], predicate)
            fix = {"params": fix_params, **{k: v for k, v in core.items() if k != "params"}}
            self._split_cache = {"key": key, "native": self.replicate((lin, fix))}
        return self._split_cache["native"]

    def split_as(self, core: PyTree, dtype) -> tuple[PyTree, PyTree]:
        """:meth:`split` cast to ``dtype`` (float64 needs x64 enabled), cached for the last core as well."""
        lin_fix = self.split(core)
        name = jnp.dtype(dtype).name
        if name not in self._split_cache:
            cast = self.replicate(optax.tree.cast(lin_fix, dtype))
            if any(jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype for a in jax.tree.leaves(cast)):
                return cast  # x64 is off: float64 was silently narrowed, not worth keeping
            self._split_cache[name] = cast
        return self._split_cache[name]

    def data(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``(x, t)`` on the mesh in ``dtype`` (the float64 copy is made once)."""
        if dtype == jnp.float32:
            return self.x, self.t
        if self._data64 is None:
            self._data64 = (self.x.astype(jnp.float64), self.t.astype(jnp.float64))
        return self._data64

    # ------------------------------------------------------------------ the retain mask

    def count(self, removed_by, dtype) -> jax.Array:
        """The loss normaliser ``n``: ``|D|`` (``regularization="fixed"``) or ``|D_r|`` (``"retained"``)."""
        if self.config.get("regularization", "fixed") == "fixed":
            return self.scalar(self.num_train, dtype)
        return self.scalar(max(int(ledger.retain_mask(removed_by).sum()), 1), dtype)

    def weights(self, removed_by, dtype) -> jax.Array:
        """Per-row weights over the padded layout: 1 for retained samples, 0 for removed and padding."""
        return self.row_weights(ledger.retain_mask(removed_by), dtype)

    def row_weights(self, rows: np.ndarray, dtype) -> jax.Array:
        """``bool[n_train]`` -> 0/1 weights over the padded, sharded row layout (padding rows get 0)."""
        mask = np.zeros(self.num_padded, np.dtype(jnp.dtype(dtype)))
        mask[: self.num_train] = rows
        return mesh_lib.shard_rows(mask, self.mesh, self.num_padded // self.mesh.size)

    def float64(self, core: PyTree, removed_by) -> tuple:
        """``(lin, fix, x, t, c, count)`` in float64 for the retained rows of ``removed_by`` (call under x64)."""
        lin, fix = self.split_as(core, jnp.float64)
        x, t = self.data(jnp.float64)
        return lin, fix, x, t, self.weights(removed_by, jnp.float64), self.count(removed_by, jnp.float64)

    def float32(self, core: PyTree, removed_by) -> tuple:
        """``(lin, fix, x, t, c, count)`` in float32 for the retained rows of ``removed_by``."""
        lin, fix = self.split(core)
        return (lin, fix, self.x, self.t, self.weights(removed_by, jnp.float32),
                self.count(removed_by, jnp.float32))

    def targets_of(self, positions: np.ndarray) -> np.ndarray:
        """Host float64 targets ``α·onehot(y)`` of the samples at ``positions``."""
        return self.config.target_scale * np.eye(self.num_classes, dtype=np.float64)[self.train_y[positions]]

    # ------------------------------------------------------------------ the model

    def apply(self, lin: PyTree, fix: PyTree, x: jax.Array) -> jax.Array:
        """Core outputs ``[B, K]`` with the linearized parameters set to ``lin``."""
        variables = {**fix, "params": kernels.merge_params(fix["params"], lin)}
        return self.model.apply(variables, x, train=False)

    def apply_one(self, lin: PyTree, fix: PyTree, x: jax.Array) -> jax.Array:
        """Outputs ``[K]`` of one unbatched example."""
        return self.apply(lin, fix, x[None])[0]

    def jacobian_rows(self, lin: PyTree, fix: PyTree, x_f: jax.Array, t_f: jax.Array, valid: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
        """``(rows [B·K, P], resid [B·K])``: the samples' Jacobian rows and targets ``t − f_c`` (traceable); rows
        where ``valid`` is False are zero."""
        jac = kernels.per_example_jacobian(lambda p, xi: self.apply_one(p, fix, xi), lin, x_f)
        keep = valid.astype(jac.dtype)
        resid = (t_f - self.apply(lin, fix, x_f)) * keep[:, None]
        jac = jac * keep[:, None, None]
        return jac.reshape(-1, jac.shape[-1]), resid.reshape(-1)

    def j_apply(self, lin: PyTree, fix: PyTree, x: jax.Array, w: PyTree) -> jax.Array:
        """``J w`` on every (padded) row: ``[n_pad, K]`` (traceable)."""
        batches = x.reshape(-1, self.batch_size, *x.shape[1:])
        out = jax.lax.map(lambda xb: jax.jvp(lambda p: self.apply(p, fix, xb), (lin,), (w,))[1], batches)
        return out.reshape(x.shape[0], -1)

    def jt_apply(self, lin: PyTree, fix: PyTree, x: jax.Array, alpha: jax.Array) -> PyTree:
        """``w = Jᵀα`` for dual coefficients ``α`` (``[n·K]``, sample-major) over the data (traceable)."""
        coef = alpha.reshape(-1, self.num_classes)
        return self._jt_sum((lin, fix), (x, jnp.pad(coef, ((0, x.shape[0] - coef.shape[0]), (0, 0)))))

    # ------------------------------------------------------------------ kernels

    def _build_kernels(self) -> None:
        bs, mu = self.batch_size, self.mu

        def grad_batch(args, batch):
            lin, fix, w_u = args
            x, t, c = batch
            return kernels.square_loss_grad_sum(lambda p: self.apply(p, fix, x), lin, w_u, t, c)

        def gn_batch(args, batch):
            lin, fix, v = args
            x, c = batch
            return kernels.gn_matvec_sum(lambda p: self.apply(p, fix, x), lin, v, c)

        def jt_batch(args, batch):
            lin, fix = args
            x, coef = batch
            _, vjp = jax.vjp(lambda p: self.apply(p, fix, x), lin)
            return vjp(coef)[0]

        def primal_gram_batch(args, batch):
            lin, fix = args
            x, t, c = batch
            jac = kernels.per_example_jacobian(lambda p, xi: self.apply_one(p, fix, xi), lin, x)  # [B, K, P]
            resid = (t - self.apply(lin, fix, x)) * c[:, None]
            jc = jac * c[:, None, None]
            hi = kernels.HIGHEST
            return jnp.einsum("bkp,bkq->pq", jc, jac, precision=hi), jnp.einsum("bkp,bk->p", jac, resid, precision=hi)

        grad_sum = mesh_lib.data_parallel_sum(grad_batch, self.mesh, bs)
        gn_sum = mesh_lib.data_parallel_sum(gn_batch, self.mesh, bs)
        self._jt_sum = mesh_lib.data_parallel_sum(jt_batch, self.mesh, bs)

        def gradient(lin, fix, w_u, x, t, c, count):
            """``(g_{D_r}(w_u), L_{D_r}(w_u))`` (sums over retained rows / ``count``, plus the μ terms)."""
            g, loss = grad_sum((lin, fix, w_u), (x, t, c))
            g = optax.tree.add_scale(optax.tree.scale(1 / count, g), mu, w_u)
            return g, loss / count + 0.5 * mu * optax.tree.vdot(w_u, w_u)

        def hessian_matvec(lin, fix, v, x, c, count):
            return optax.tree.add_scale(optax.tree.scale(1 / count, gn_sum((lin, fix, v), (x, c))), mu, v)

        def precond(pre):
            return None if pre is None else solvers.nystrom_precond(pre, mu)

        def newton_step(lin, fix, w_u, x, t, c, count, tol, atol, maxiter, pre=None, ref=None):
            w_ref, ref_tol = (None, 0.0) if ref is None else ref
            return solvers.newton_cg_step(
                lambda w: gradient(lin, fix, w, x, t, c, count)[0],
                lambda u: hessian_matvec(lin, fix, u, x, c, count), w_u, tol=tol, atol=atol, maxiter=maxiter,
                precond=precond(pre), w_ref=w_ref, ref_tol=ref_tol)

        def hessian_solve(lin, fix, rhs, x, c, count, tol, maxiter, pre=None):
            return kernels.cg_solve(lambda u: hessian_matvec(lin, fix, u, x, c, count), rhs, tol=tol,
                                    maxiter=maxiter, precond=precond(pre))

        def nystrom(lin, fix, x, c, rank):
            count = jnp.maximum(jnp.sum(c), 1).astype(x.dtype)
            data_term = lambda v: optax.tree.scale(1 / count, gn_sum((lin, fix, v), (x, c)))
            return solvers.nystrom_sketch(data_term, lin, rank, jax.random.key(0))

        def largest_eigenvalue(lin, fix, x, c, count):
            v0 = optax.tree.random_like(jax.random.key(0), lin)
            lam, _ = optax.power_iteration(lambda u: hessian_matvec(lin, fix, u, x, c, count), v0=v0, num_iters=50)
            return lam

        def predict(lin, fix, w_u, x):
            return kernels.linearized_apply(lambda p: self.apply(p, fix, x), lin, w_u)

        def dual_gram_block(lin, fix, x, x_block):
            jac = kernels.per_example_jacobian(lambda p, xi: self.apply_one(p, fix, xi), lin, x_block)
            tangents = jac.reshape(-1, jac.shape[-1])  # [block·K, P]
            batches = x.reshape(-1, bs, *x.shape[1:])
            cols = jax.lax.map(lambda xb: kernels.jacobian_times(lambda p: self.apply(p, fix, xb), lin, tangents),
                               batches)  # [nb, bs, K, block·K]
            return cols.reshape(-1, tangents.shape[0])  # rows ordered (sample, output)

        def dual_targets(lin, fix, x, t):
            return jax.lax.map(lambda xt: xt[1] - self.apply(lin, fix, xt[0]),
                               (x.reshape(-1, bs, *x.shape[1:]), t.reshape(-1, bs, t.shape[-1]))).reshape(t.shape)

        def add_noise(w, key, sigma):
            return optax.tree.add_scale(w, sigma.astype(jax.tree.leaves(w)[0].dtype), optax.tree.random_like(key, w))

        self.gradient = jax.jit(highest(gradient))
        self.gradient_norm = jax.jit(highest(lambda *args: optax.tree.norm(gradient(*args)[0])))
        self.hessian_matvec = jax.jit(highest(hessian_matvec))
        self.newton_step = jax.jit(highest(newton_step))
        self.hessian_solve = jax.jit(highest(hessian_solve))
        self.nystrom = jax.jit(highest(nystrom), static_argnums=(4,))
        self.largest_eigenvalue = jax.jit(highest(largest_eigenvalue))
        self.predict = jax.jit(highest(predict))
        self.primal_gram = jax.jit(highest(mesh_lib.data_parallel_sum(primal_gram_batch, self.mesh, bs)))
        self.dual_gram_block = jax.jit(highest(dual_gram_block))
        self.dual_targets = jax.jit(highest(dual_targets))
        self.jt_sum = jax.jit(highest(self._jt_sum))
        # The reference solve (oracle) compiles its own copy: its reduced sizes change with every request, and
        # those traces must not count as (or evict) the forget path's compilations.
        self.ref_jt_sum = jax.jit(highest(mesh_lib.data_parallel_sum(jt_batch, self.mesh, bs)))
        self.norm = jax.jit(optax.tree.norm)
        self.zeros_like = jax.jit(optax.tree.zeros_like)
        self.ravel = jax.jit(lambda tree: ravel_pytree(tree)[0])
        self.unravel = jax.jit(lambda vec, like: ravel_pytree(like)[1](vec))  # ``like`` fixes structure and dtype
        self.add_noise = jax.jit(add_noise)


__all__ = ["LinearizedProblem", "highest"]
