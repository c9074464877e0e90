r"""Combining the nodes' logits into one prediction (spec ``safe.md`` §6).

All rules take the stacked logits ``[n, batch, C]`` of the active nodes and return class probabilities
``[batch, C]`` that sum to one:

* ``softmax_mean`` (default): :math:`p(y|x) = \frac1n \sum_i \mathrm{softmax}(a_i(x))_y`;
* ``logit_mean``: the softmax of the mean logits;
* ``vote``: SISA's aggregation, the mean of one-hot argmax votes (ties count for each tied class's lowest index);
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


def combine(logits: Array, rule: str = "softmax_mean", *, weights: Array | None = None,
            coverage: Array | None = None) -> Array:
    """Class probabilities ``[batch, C]`` from node logits ``[n, batch, C]``.

    Args:
      logits: ``[n, batch, C]``.
      rule: one of :data:`RULES`.
      weights: ``[n]`` non-negative node weights (``proportional``).
      coverage: ``[n, C]`` bool, the classes each node's training set holds (``coverage_aware``).
    """
    if logits.ndim != 3:
        raise errors.ShapeDtypeError(f"Node logits must be [nodes, batch, classes], got shape {logits.shape}.")
    if rule == "softmax_mean":
        return jax.nn.softmax(logits, -1).mean(0)
    if rule == "logit_mean":
        return jax.nn.softmax(logits.mean(0), -1)
    if rule == "vote":
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=logits.dtype).mean(0)
    if rule == "proportional":
        if weights is None or weights.shape != logits.shape[:1]:
            raise errors.ShapeDtypeError(f"rule 'proportional' needs one weight per node ({logits.shape[0]}).")
        w = weights / weights.sum()
        return jnp.einsum("n,nbc->bc", w, jax.nn.softmax(logits, -1))
    if rule == "coverage_aware":
        if coverage is None or coverage.shape != (logits.shape[0], logits.shape[-1]):
            raise errors.ShapeDtypeError(f"rule 'coverage_aware' needs a [nodes, classes] = "
                                         f"{(logits.shape[0], logits.shape[-1])} coverage mask.")
        cover = coverage[:, None, :]
        probs = jax.nn.softmax(jnp.where(cover, logits, -jnp.inf), -1)
        probs = jnp.where(cover, probs, 0.0)
        per_class = probs.sum(0) / jnp.maximum(coverage.sum(0), 1).astype(probs.dtype)[None, :]
        return per_class / per_class.sum(-1, keepdims=True)
    raise errors.ConfigError(f"Unknown ensemble rule {rule!r}; valid: {', '.join(RULES)}.")
