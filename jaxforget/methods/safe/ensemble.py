r"""Combining the nodes' logits into one prediction (spec ``safe.md`` §6).

All rules take the stacked logits ``[n, batch, C]`` of the active nodes and return class probabilities
``[batch, C]`` that sum to one:

* ``softmax_mean`` (default): :math:`p(y|x) = \frac1n \sum_i \mathrm{softmax}(a_i(x))_y`;
* ``logit_mean``: the softmax of the mean logits;
* ``vote``: SISA's aggregation, the mean of one-hot argmax votes (a tie goes to the lowest class index);
* ``proportional``: the softmax mean weighted by ``weights`` (``∝ |D_i|``, recomputed after deletions);
* ``coverage_aware`` (a deviation, not known to be in SAFE): each node's softmax over the classes its ``D_i``
  holds, each class averaged over the nodes that cover it, renormalised over classes. It equals ``softmax_mean``
  when every node covers every class.

Examples:
  >>> logits = jnp.array([[[2.0, 0.0]], [[0.0, 1.0]]])        # 2 nodes, 1 example, 2 classes
  >>> combine(logits, "vote").tolist()
  [[0.5, 0.5]]
  >>> bool(jnp.allclose(combine(logits, "softmax_mean").sum(-1), 1.0))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxforget import errors

Array = jax.Array

RULES = ("softmax_mean", "logit_mean", "vote", "proportional", "coverage_aware")


def combine(logits: Array, rule: str = "softmax_mean", *, active: Array | None = None, weights: Array | None = None,
            coverage: Array | None = None) -> Array:
    """Class probabilities ``[batch, C]`` from node logits ``[n, batch, C]``.

    Args:
      logits: ``[n, batch, C]``.
      rule: one of :data:`RULES`.
      active: ``[n]`` bool, the nodes that take part (a node whose own shard was emptied is dropped); all by default.
      weights: ``[n]`` non-negative node weights (``proportional``: ``|D_i|``).
      coverage: ``[n, C]`` bool, the classes each node's training set holds (``coverage_aware``).
    """
    if logits.ndim != 3:
        raise errors.ShapeDtypeError(f"Node logits must be [nodes, batch, classes], got shape {logits.shape}.")
    n, classes = logits.shape[0], logits.shape[-1]
    on = jnp.ones(n, logits.dtype) if active is None else active.astype(logits.dtype)
    if rule == "proportional":
        if weights is None or weights.shape != (n,):
            raise errors.ShapeDtypeError(f"rule 'proportional' needs one weight per node ({n}).")
        on = on * weights.astype(logits.dtype)
    w = on / jnp.maximum(on.sum(), jnp.finfo(logits.dtype).tiny)
    if rule in ("softmax_mean", "proportional"):
        return jnp.einsum("n,nbc->bc", w, jax.nn.softmax(logits, -1))
    if rule == "logit_mean":
        return jax.nn.softmax(jnp.einsum("n,nbc->bc", w, logits), -1)
    if rule == "vote":
        return jnp.einsum("n,nbc->bc", w, jax.nn.one_hot(jnp.argmax(logits, -1), classes, dtype=logits.dtype))
    if rule == "coverage_aware":
        if coverage is None or coverage.shape != (n, classes):
            raise errors.ShapeDtypeError(f"rule 'coverage_aware' needs a [nodes, classes] = {(n, classes)} coverage "
                                         "mask.")
        cover = (coverage & (on > 0)[:, None])[:, None, :]
        probs = jnp.where(cover, jax.nn.softmax(jnp.where(cover, logits, -jnp.inf), -1), 0.0)
        per_class = probs.sum(0) / jnp.maximum(cover.sum(0), 1).astype(probs.dtype)
        return per_class / per_class.sum(-1, keepdims=True)
    raise errors.ConfigError(f"Unknown ensemble rule {rule!r}; valid: {', '.join(RULES)}.")
