"""The frozen backbone: a network trained on core data only, and its features at one layer.

SAFE's adapters never train the backbone (spec ``safe.md`` §1, §7.1): it is trained once on the ``core`` split, which
no request can name, and its BatchNorm statistics come from core data only. Each sample's features are computed
once (:class:`FeatureCache`, keyed by the backbone's content and the inputs' content) and every node reads them.

A layer is named by a submodule of the flax model (``models.layer_names``): ``"head:input"`` (default) is the
penultimate representation, ``"conv_1:output"`` a CNN's last convolutional map (``[H, W, C]``, a token map for the
cross-attention adapter).

Examples:
  >>> from jaxforget import models
  >>> model = models.MLP(hidden=(6,), num_classes=3)
  >>> variables = models.init_variables(model, jax.random.key(0), (2, 2, 1))
  >>> layer_features(model, variables, np.zeros((4, 2, 2, 1), np.float32), "head:input").shape
  (4, 6)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxforget import data as data_lib
from jaxforget import errors, models, train
from jaxforget import fingerprint as fingerprint_lib
from jaxforget.methods import base

SIDES = ("input", "output")


def parse_layer(layer: str) -> tuple[str, str]:
    """``"name:side"`` → ``(name, side)``; ``side`` defaults to ``input``."""
    name, _, side = layer.partition(":")
    side = side or "input"
    if not name or side not in SIDES:
        raise errors.ConfigError(f"A feature layer is '<submodule>[:input|:output]', got {layer!r}.")
    return name, side


def layer_features(model: nn.Module, variables, x: jax.Array, layer: str) -> jax.Array:
    """The activations ``[batch, …]`` entering (``:input``) or leaving (``:output``) submodule ``layer`` (eval mode).

    Raises:
      ConfigError: the model has no submodule of that name (the top-level names are listed).
    """
    name, side = parse_layer(layer)
    records: list = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == name and not records:
            records.append(args[0] if side == "input" else out)
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, x, train=False)
    if not records:
        raise errors.ConfigError(f"The backbone has no submodule {name!r}; its layers are "
                                 f"{models.layer_names(variables['params'])}.")
    return records[0]


@functools.lru_cache(maxsize=16)
def _jitted_features(model: nn.Module, layer: str) -> Callable:
    return jax.jit(functools.partial(layer_features, model, layer=layer))


def features(model: nn.Module, variables, x: np.ndarray, layer: str, *, batch_size: int = 512) -> jax.Array:
    """:func:`layer_features` over a host array in fixed-size batches (the last padded: one compilation), float32."""
    return base.batched_apply(_jitted_features(model, layer), variables, x, batch_size)


def train_backbone(model: nn.Module, splits: data_lib.Splits, config: ml_collections.ConfigDict,
                   key: jax.Array):
    """The backbone: ``config`` (epochs, batch_size, learning_rate, momentum, weight_decay) of cross-entropy SGD on
    core data only, BatchNorm statistics from core data only."""
    core = splits.core()
    init_key, order_key = jax.random.split(key)
    variables = models.init_variables(model, init_key, core.x.shape[1:])
    seed = int(np.asarray(jax.random.randint(order_key, (), 0, 2**30)))
    variables, _ = train.train_classifier(model, variables, core.x, core.y, epochs=config.epochs,
                                          batch_size=config.batch_size, learning_rate=config.learning_rate,
                                          momentum=config.momentum, weight_decay=config.weight_decay, seed=seed,
                                          desc="backbone")
    return models.batch_stats_from_data(model, variables, core.x)


class FeatureCache:
    """Features of the training set per backbone, keyed by the backbone's content (and the layer).

    Saves the backbone pass only; a state's results never depend on whether the entry was there (the same
    function of the same content computes it again).
    """

    def __init__(self, model: nn.Module, x: np.ndarray, layer: str, *, max_entries: int = 4):
        self.model, self.x, self.layer, self.max_entries = model, x, layer, max_entries
        self._x_key = fingerprint_lib.fingerprint(x)
        self._backbone_key = fingerprint_lib.Memo()  # a request passes the same backbone arrays: no re-hash
        self._entries: dict[str, jax.Array] = {}

    def get(self, backbone) -> jax.Array:
        key = self._backbone_key(backbone) + self._x_key + self.layer
        if key not in self._entries:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = features(self.model, backbone, self.x, self.layer)
        return self._entries[key]
