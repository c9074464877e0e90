r"""The paper's SGD: the training recipe for ``w_u`` and its forget solver.

Training (and the "50-epoch SGD retrain" baseline) minimises the linearized square loss by the library's SGD
(:func:`jaxforget.train.sgd_update`: heavy-ball momentum, :func:`jaxforget.train.cosine_lr` decay) from 0. The
forget solver runs the same loop on the auxiliary quadratic :math:`\tfrac12 v^\top H_B v - g^\top v` with the exact
retained gradient ``g`` and step ``1/β̂``, so ``w_u - v`` approaches the Newton step as epochs grow (Golatkar et
al., CVPR 2021, §4). One compiled epoch serves training, retraining and every request.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxforget import data as data_lib
from jaxforget import kernels, train
from jaxforget.methods.mixed_linear.problem import LinearizedProblem, highest

PyTree = Any


class SGDRecipe:
    """The paper's SGD loop on one :class:`LinearizedProblem` (compiled once per problem)."""

    def __init__(self, problem: LinearizedProblem):
        self.problem = pb = problem
        mu = pb.mu

        def batch_grad(lin, fix, w, x, t, c, g_exact, quadratic, batch_norm):
            """Minibatch gradient of L_B(w) (training), or of the auxiliary quadratic ½wᵀH_B w − gᵀw.

            ``batch_norm > 0`` is the fixed normaliser's unbiased batch scale ``|B|·n/n_padded``; 0 means the
            per-retained mean (ratio estimator over the batch's retained rows).
            """
            f = lambda p: pb.apply(p, fix, x)
            count = jnp.where(batch_norm > 0, batch_norm, jnp.maximum(jnp.sum(c), 1).astype(x.dtype))
            if quadratic:
                gb = kernels.gn_matvec_sum(f, lin, w, c)
                return optax.tree.sub(optax.tree.add_scale(optax.tree.scale(1 / count, gb), mu, w), g_exact)
            gb, _ = kernels.square_loss_grad_sum(f, lin, w, t, c)
            return optax.tree.add_scale(optax.tree.scale(1 / count, gb), mu, w)

        def epoch(quadratic, lin, fix, w, opt_state, x, t, c, batches, g_exact, lr0, step0, total, batch_norm):
            def step(carry, idx):
                w, opt_state, k = carry
                grad = batch_grad(lin, fix, w, x[idx], t[idx], c[idx], g_exact, quadratic, batch_norm)
                w, opt_state = train.sgd_update(grad, w, opt_state, train.cosine_lr(lr0, k, total))
                return (w, opt_state, k + 1), None

            (w, opt_state, _), _ = jax.lax.scan(step, (w, opt_state, step0), batches)
            return w, opt_state

        self._epoch = jax.jit(highest(epoch), static_argnums=(0,))
        self._init = jax.jit(train.init_optimizer, static_argnames=("momentum",))

    def run(self, lin: PyTree, fix: PyTree, c: jax.Array, w: PyTree, *, epochs: int, batch_size: int,
            learning_rate: float, momentum: float, seed: int, g_exact: PyTree | None = None) -> PyTree:
        """``epochs`` of SGD from ``w`` on the rows weighted by ``c`` (on the auxiliary quadratic with ``g_exact``).

        Args:
          lin, fix: the split core (:meth:`LinearizedProblem.split`).
          c: per-row weights (:meth:`LinearizedProblem.weights`).
          w: start (float32 user weights).
          epochs, batch_size, learning_rate, momentum, seed: the recipe (cosine decay over all steps).
          g_exact: the exact retained gradient: run the forget solver on ``½vᵀH v − gᵀv`` instead of training.

        Returns:
          The final iterate (float32).
        """
        pb = self.problem
        w = pb.replicate(w)
        opt_state = pb.replicate(self._init(w, momentum=float(momentum)))
        g = pb.zeros_like(w) if g_exact is None else g_exact
        steps_per_epoch = pb.num_padded // batch_size
        total = pb.scalar(max(epochs * steps_per_epoch, 1), jnp.float32)
        fixed = pb.config.get("regularization", "fixed") == "fixed"
        batch_norm = pb.scalar(batch_size * pb.num_train / pb.num_padded if fixed else 0.0, jnp.float32)
        lr0 = pb.scalar(learning_rate, jnp.float32)
        for epoch in range(epochs):
            batches = np.stack(data_lib.batch_indices(pb.num_padded, batch_size, seed=seed, epoch=epoch,
                                                      drop_last=True))
            w, opt_state = self._epoch(g_exact is not None, lin, fix, w, opt_state, pb.x, pb.t, c,
                                       jax.device_put(batches), g, lr0, pb.scalar(epoch * steps_per_epoch, jnp.int32),
                                       total, batch_norm)
        return w


def beta_bound(beta_full: float, mu: float, num_train: int, num_retained: int, fixed: bool) -> float:
    """An upper bound on ``λ_max(H_{D_r})`` from ``β`` of the full set, with no power iteration per request.

    ``(1/n_r) Σ_{D_r} J_iᵀJ_i ⪯ (n/n_r) (1/n) Σ_D J_iᵀJ_i``, and ``H_{D_r} ⪯ H_D`` with the fixed normaliser.

    Examples:
      >>> beta_bound(2.0, 0.5, 100, 50, fixed=True), beta_bound(2.0, 0.5, 100, 50, fixed=False)
      (2.0, 3.5)
    """
    if fixed:
        return beta_full
    return mu + (beta_full - mu) * num_train / num_retained


__all__ = ["SGDRecipe", "beta_bound"]
