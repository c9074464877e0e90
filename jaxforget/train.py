"""A generic optax training loop for classifiers: originals, core networks, oracles and baselines.

Cross-entropy with coupled L2 (``optax.add_decayed_weights``, so the fixed point is the minimiser of
the regularised loss), SGD with momentum and cosine decay, BatchNorm in train mode. One jitted epoch
(``lax.scan`` over index batches) per call, so an epoch costs one dispatch and nothing recompiles
between epochs. The batch order comes from ``(seed, epoch)``, so a resumed run replays exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxforget import data as data_lib
from jaxforget import progress

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    r"""Mean (or weighted-mean) softmax cross-entropy :math:`-\log p_{y}(x)`.

    Args:
      logits: ``[B, K]``.
      labels: ``[B]`` integer classes.
      weights: optional ``[B]`` example weights (padding rows get 0).

    Examples:
      >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
      1.3863
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return losses.mean()
    weights = weights.astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def cosine_schedule(learning_rate: float, total_steps: int):
    r"""Cosine decay :math:`\eta_t = \eta_0 \cdot \tfrac12 (1 + \cos(\pi \min(t/T, 1)))`.

    Written out (rather than ``optax.cosine_decay_schedule``) so that it casts the integer step count
    explicitly and works under strict dtype promotion.

    Examples:
      >>> round(float(cosine_schedule(1.0, 10)(jnp.int32(5))), 6)
      0.5
    """
    total = float(max(total_steps, 1))

    def schedule(count):
        frac = jnp.minimum(jnp.asarray(count).astype(jnp.float32) / total, 1.0)
        return learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def make_optimizer(
    *, learning_rate: float, total_steps: int, momentum: float = 0.9, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """SGD with momentum, cosine-decayed learning rate and coupled L2 (never decoupled AdamW-style)."""
    schedule = cosine_schedule(learning_rate, total_steps)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum if momentum else None),
    )


def _epoch_body(model: nn.Module, optimizer: optax.GradientTransformation):
    def step(carry, batch_idx, x, y):
        variables, opt_state = carry
        xb, yb = x[batch_idx], y[batch_idx]
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(p):
            if rest:
                logits, updates = model.apply({"params": p, **rest}, xb, train=True, mutable=list(rest))
            else:
                logits, updates = model.apply({"params": p}, xb, train=True), {}
            return cross_entropy(logits, yb), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
        return ({"params": params, **rest, **updates}, opt_state), loss

    def epoch(variables, opt_state, x, y, batches):
        (variables, opt_state), losses = jax.lax.scan(
            lambda c, b: step(c, b, x, y), (variables, opt_state), batches
        )
        return variables, opt_state, losses.mean()

    return epoch


@functools.cache
def _epoch_fn(model: nn.Module, optimizer: optax.GradientTransformation):
    return jax.jit(_epoch_body(model, optimizer))


@functools.cache
def _population_epoch_fn(model: nn.Module, optimizer: optax.GradientTransformation):
    # Models and batch orders are stacked on axis 0; the data is shared.
    return jax.jit(jax.vmap(_epoch_body(model, optimizer), in_axes=(0, 0, None, None, 0)))


def _batch_and_optimizer(n, batch_size, epochs, learning_rate, momentum, weight_decay):
    """The effective batch size (at most ``n``) and the optimizer whose cosine schedule spans every step."""
    batch_size = min(batch_size, n)
    optimizer = make_optimizer(learning_rate=learning_rate, total_steps=epochs * (n // batch_size),
                               momentum=momentum, weight_decay=weight_decay)
    return batch_size, optimizer


def train_classifier(
    model: nn.Module,
    variables: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str = "train",
) -> tuple[PyTree, list[float]]:
    """Trains a classifier with cross-entropy; returns the new variables and the per-epoch mean loss.

    Args:
      model: a flax module called as ``model.apply(variables, x, train=...)``.
      variables: initial ``{"params": ..., ["batch_stats": ...]}``.
      x: ``[n, H, W, C]`` float images in [0, 1].
      y: ``[n]`` int labels.
      epochs: passes over the data.
      batch_size: minibatch size (the last partial batch of an epoch is dropped, so ``n ≥ batch_size``).
      learning_rate: initial learning rate of the cosine schedule.
      momentum: SGD momentum (0 for plain SGD).
      weight_decay: coupled L2 coefficient.
      seed: data-order seed.
      desc: progress-bar label.

    Returns:
      ``(variables, losses)``.
    """
    n = int(len(x))
    batch_size, optimizer = _batch_and_optimizer(n, batch_size, epochs, learning_rate, momentum, weight_decay)
    opt_state = optimizer.init(variables["params"])
    epoch_fn = _epoch_fn(model, optimizer)
    x_dev, y_dev = jax.device_put(jnp.asarray(x)), jax.device_put(jnp.asarray(y))
    losses = []
    for epoch in progress.track(range(epochs), desc=desc):
        batches = np.stack(data_lib.batch_indices(n, batch_size, seed=seed, epoch=epoch, drop_last=True))
        variables, opt_state, loss = epoch_fn(variables, opt_state, x_dev, y_dev, jax.device_put(batches))
        losses.append(float(loss))
    return variables, losses


def train_classifiers(
    model: nn.Module,
    variables: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seeds: list[int],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    desc: str = "train population",
) -> tuple[PyTree, np.ndarray]:
    """Trains a population of classifiers in parallel: one ``vmap``-ped epoch program for all of them.

    Model ``i`` starts from ``variables[i]`` (every leaf has a leading ``[M]`` axis) and sees the batch order
    of ``seeds[i]``, so it equals ``train_classifier(..., seed=seeds[i])`` on the unstacked variables up to
    float reassociation. Used for the retrain / original populations of the distributional scores.

    Args:
      model, x, y, epochs, batch_size, learning_rate, momentum, weight_decay: as :func:`train_classifier`.
      variables: stacked initial variables, leading axis ``M``.
      seeds: ``M`` data-order seeds.

    Returns:
      ``(variables, losses)``: stacked trained variables and the ``[M, epochs]`` per-epoch mean losses.

    Examples:
      >>> from jaxforget import models
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> v = jax.vmap(lambda k: models.init_variables(model, k, (4,)))(jax.random.split(jax.random.key(0), 2))
      >>> x, y = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), np.arange(8) % 3
      >>> out, losses = train_classifiers(model, v, x, y, seeds=[0, 1], epochs=2, batch_size=4,
      ...                                 learning_rate=0.1)
      >>> losses.shape
      (2, 2)
    """
    n = int(len(x))
    batch_size, optimizer = _batch_and_optimizer(n, batch_size, epochs, learning_rate, momentum, weight_decay)
    opt_state = jax.vmap(optimizer.init)(variables["params"])
    epoch_fn = _population_epoch_fn(model, optimizer)
    x_dev, y_dev = jax.device_put(jnp.asarray(x)), jax.device_put(jnp.asarray(y))
    losses = []
    for epoch in progress.track(range(epochs), desc=desc):
        batches = np.stack([
            np.stack(data_lib.batch_indices(n, batch_size, seed=int(s), epoch=epoch, drop_last=True)) for s in seeds
        ])
        variables, opt_state, loss = epoch_fn(variables, opt_state, x_dev, y_dev, jax.device_put(batches))
        losses.append(np.asarray(loss))
    return variables, np.stack(losses, axis=1) if losses else np.zeros((len(seeds), 0))
