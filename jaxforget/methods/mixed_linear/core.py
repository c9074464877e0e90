"""Core training: ``w_c`` by cross-entropy on core data only (one core, or a vmapped population of cores).

The core never sees user data (its batch statistics included), so it never needs to be retrained: every
forget request, the exact retrain and forget-all keep it (Golatkar et al., CVPR 2021, §3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxforget import data as data_lib
from jaxforget import models, train

PyTree = Any


def _seed(key: jax.Array) -> int:
    """The data-order seed a core's key determines."""
    return int(jax.random.randint(key, (), 0, 2**30))


def train_core(model: nn.Module, splits: data_lib.Splits, config: ml_collections.ConfigDict, key: jax.Array
               ) -> PyTree:
    """Trains ``w_c`` with cross-entropy on core data only; BN statistics come from core data only.

    Args:
      model: the flax module.
      splits: the dataset split (its ``core()`` set is used).
      config: ``method.core`` (epochs, batch_size, learning_rate, momentum, weight_decay).
      key: initialisation and data-order key.

    Returns:
      The core variables ``{"params": ..., ["batch_stats": ...]}``.
    """
    core_set = splits.core()
    variables = models.init_variables(model, key, core_set.x.shape[1:])
    variables, _ = train.train_classifier(
        model, variables, core_set.x, core_set.y, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay,
        seed=_seed(key), desc="core",
    )
    return models.batch_stats_from_data(model, variables, core_set.x)


def train_cores(model: nn.Module, splits: data_lib.Splits, config: ml_collections.ConfigDict,
                keys: list[jax.Array], *, chunk: int = 64) -> list[PyTree]:
    """Trains one core per key in parallel (one ``vmap``-ped program per ``chunk`` cores).

    Core ``i`` equals ``train_core(..., keys[i])`` up to float reassociation: the same initialisation and
    data-order seed. Used for populations of independently trained models (distributional scores).

    Args:
      model, splits, config: as :func:`train_core`.
      keys: PRNG keys, one per core.
      chunk: cores trained at once (bounds memory).

    Returns:
      A list of ``len(keys)`` core variable trees.
    """
    core_set = splits.core()
    out = []
    for lo in range(0, len(keys), chunk):
        part = keys[lo : lo + chunk]
        variables = [models.init_variables(model, k, core_set.x.shape[1:]) for k in part]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *variables)
        stacked, _ = train.train_classifiers(
            model, stacked, core_set.x, core_set.y, seeds=[_seed(k) for k in part], epochs=config.epochs,
            batch_size=config.batch_size, learning_rate=config.learning_rate, momentum=config.momentum,
            weight_decay=config.weight_decay, desc=f"cores {lo}-{lo + len(part) - 1}",
        )
        for i in range(len(part)):
            one = jax.tree.map(lambda a, i=i: a[i], stacked)
            out.append(models.batch_stats_from_data(model, one, core_set.x))
    return out


__all__ = ["train_core", "train_cores"]
