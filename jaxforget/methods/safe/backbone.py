"""The frozen backbone: a network trained on core data only, and its features at one layer.

SAFE's adapters never train the backbone (spec ``safe.md`` §1, §7.1): it is trained once on the ``core`` split, which
no request can name, and its BatchNorm statistics come from core data only. Each sample's features are computed
once (:class:`FeatureCache`, keyed by the backbone's content and the inputs' content) and every node reads them.

A layer is named by a submodule of the flax model (``models.layer_names``): ``"head:input"`` (default) is the
penultimate representation, ``"conv_1:output"`` a CNN's last convolutional map (``[H, W, C]``, a token map for the
cross-attention adapter).

A user may bring their own backbone instead (:func:`save_backbone`, :func:`load_backbone`): an orbax checkpoint of its
flax variables with the dataset ids it was trained on. SAFE's deletions never retrain the backbone, so one that saw
a forgettable id is refused (:func:`check_disjoint`), and so is one whose training ids are undeclared.

Examples:
  >>> from jaxforget import models
  >>> model = models.MLP(hidden=(6,), num_classes=3)
  >>> variables = models.init_variables(model, jax.random.key(0), (2, 2, 1))
  >>> layer_features(model, variables, np.zeros((4, 2, 2, 1), np.float32), "head:input").shape
  (4, 6)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxforget import data as data_lib
from jaxforget import errors, models, train
from jaxforget import fingerprint as fingerprint_lib
from jaxforget.methods import base

PyTree = Any

SIDES = ("input", "output")

#: The format tag of a saved backbone's metadata; bumped when the layout changes, so old files are never misread.
BACKBONE_FORMAT = "jaxforget.safe.backbone/1"


class BackboneDataError(errors.ConfigError):
    """A backbone trained on forgettable ids (a deletion would have to retrain it too), or whose training ids are
    undeclared."""


class CorruptBackboneError(errors.JaxForgetError, RuntimeError):
    """A saved backbone whose files are damaged, or whose content differs from the fingerprint it was saved with."""


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


# --------------------------------------------------------------------------------------------------
# A user's own backbone, on disk
# --------------------------------------------------------------------------------------------------


def _train_ids(train_ids, where: str) -> np.ndarray:
    """``train_ids`` as a sorted int64 array.

    Raises:
      BackboneDataError: ``None`` (undeclared).
      ShapeDtypeError: not a 1-D sequence of integers.
      ConfigError: duplicate ids.
    """
    if train_ids is None:
        raise BackboneDataError(f"{where}: the backbone's training ids are undeclared. Pass the dataset ids it was "
                                "trained on (an empty list if it was trained on other data entirely).")
    arr = np.asarray(train_ids)
    if arr.ndim != 1:
        raise errors.ShapeDtypeError(f"{where}: train_ids must be a 1-D sequence of integers, got shape {arr.shape}.")
    if arr.size == 0:  # np.asarray([]) is float64
        return np.zeros((0,), np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise errors.ShapeDtypeError(f"{where}: train_ids must be integers, got dtype {arr.dtype}.")
    uniq, counts = np.unique(arr.astype(np.int64), return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise errors.ConfigError(f"{where}: train_ids has {dup.size} duplicate id(s), e.g. {dup[:5].tolist()}.")
    return uniq


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous: save returns once the temporary directory has been renamed into place. The handlers are named
    # up front: one inferred from a meta-only restore would leave the variables' metadata unreadable.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(variables=ocp.StandardCheckpointHandler(),
                                                           meta=ocp.JsonCheckpointHandler()))


def save_backbone(directory: str, variables: PyTree, *, train_ids) -> None:
    """Writes a backbone's flax variables and the dataset ids it was trained on, atomically.

    One orbax checkpoint holds the variables (host copies) and a JSON record: the format tag
    (:data:`BACKBONE_FORMAT`), the sorted ``train_ids`` and the variables' :func:`jaxforget.fingerprint.fingerprint`.
    Orbax writes it to a temporary directory and renames it when complete: a crash never leaves a half-written
    backbone under ``directory``.

    Args:
      directory: where to write; must not exist yet, or be an empty directory.
      variables: the model's variables, e.g. ``{"params": ..., "batch_stats": ...}``.
      train_ids: every dataset id the backbone (and its BatchNorm statistics) saw, an integer sequence; empty if
        it was trained on other data entirely.

    Raises:
      ConfigError: ``directory`` exists and is not an empty directory (nothing is overwritten), or ``train_ids``
        has duplicates.
      BackboneDataError: ``train_ids`` is ``None``.
      ShapeDtypeError: ``train_ids`` is not a 1-D sequence of integers.
    """
    path = os.path.abspath(directory)
    ids = _train_ids(train_ids, f"save_backbone({path})")
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.listdir(path):
            raise errors.ConfigError(f"save_backbone: {path} already exists and is not an empty directory; "
                                     "a saved backbone is never overwritten (choose another path or delete it).")
        os.rmdir(path)  # orbax renames its temporary directory onto the path, which must not exist
    host = flax.core.unfreeze(jax.tree.map(np.asarray, variables))  # host numpy: restores on any device
    meta = {"format": BACKBONE_FORMAT, "train_ids": ids.tolist(), "fingerprint": fingerprint_lib.fingerprint(host)}
    checkpointer = _checkpointer()
    try:
        checkpointer.save(path, args=ocp.args.Composite(variables=ocp.args.StandardSave(host),
                                                        meta=ocp.args.JsonSave(meta)))
    finally:
        checkpointer.close()


def _spec(leaf) -> tuple[tuple[int, ...], np.dtype]:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return tuple(np.shape(leaf)), np.dtype(dtype)


def _check_stored_like(stored: PyTree, like: PyTree, path: str) -> None:
    """Raises :class:`ShapeDtypeError` at the first leaf of ``like`` that the checkpoint lacks or stores with another
    shape or dtype, then at any leaf the checkpoint has and ``like`` lacks (orbax would restore the stored shapes
    silently, and cast dtypes)."""
    have = {jax.tree_util.keystr(p): _spec(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(stored)}
    want = [(jax.tree_util.keystr(p), _spec(leaf)) for p, leaf in jax.tree_util.tree_leaves_with_path(like)]
    for name, (shape, dtype) in want:
        if name not in have:
            raise errors.ShapeDtypeError(f"Backbone {path} does not match the model: it has no leaf {name} "
                                         f"(the model's is {shape} {dtype}).")
        if have[name] != (shape, dtype):
            raise errors.ShapeDtypeError(
                f"Backbone {path} does not match the model: leaf {name} is stored with shape {have[name][0]} and "
                f"dtype {have[name][1]}, the model expects shape {shape} and dtype {dtype}."
            )
    extra = sorted(set(have) - {name for name, _ in want})
    if extra:
        raise errors.ShapeDtypeError(f"Backbone {path} does not match the model: it stores leaves the model lacks, "
                                     f"first {extra[0]} ({len(extra)} in all).")


def load_backbone(directory: str, like: PyTree) -> tuple[PyTree, np.ndarray]:
    """Restores a backbone written by :func:`save_backbone`.

    Args:
      directory: the saved backbone.
      like: the model's variables or their abstract shapes (arrays or ``jax.ShapeDtypeStruct``), e.g.
        ``models.init_variables(model, key, input_shape)``: the structure, shapes and dtypes to restore into.

    Returns:
      ``(variables, train_ids)``: the variables as jax arrays in the structure of ``like`` (plain nested dicts),
      and the sorted int64 ids the backbone was trained on. Pass them to :func:`check_disjoint`.

    Raises:
      ConfigError: ``directory`` is missing, unreadable or not a saved backbone of this format.
      BackboneDataError: the metadata declares no training ids.
      ShapeDtypeError: the stored tree's structure, shapes or dtypes differ from ``like`` (the first leaf is named).
      CorruptBackboneError: the array files are damaged, or their content differs from the saved fingerprint.
    """
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise errors.ConfigError(f"load_backbone: no saved backbone at {path} (not a directory).")
    checkpointer = _checkpointer()
    try:
        try:
            meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a missing item or unparsable JSON
            raise errors.ConfigError(f"load_backbone: {path} is not a readable saved backbone "
                                     f"({type(e).__name__}: {e}).") from e
        if not isinstance(meta, dict) or meta.get("format") != BACKBONE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise errors.ConfigError(f"load_backbone: {path} has format {found!r}, expected {BACKBONE_FORMAT!r}.")
        ids = _train_ids(meta.get("train_ids"), f"load_backbone({path})")
        expected = meta.get("fingerprint")
        if not isinstance(expected, str):
            raise CorruptBackboneError(f"load_backbone: {path} records no content fingerprint; it cannot be checked.")
        try:
            stored = checkpointer.metadata(path).item_metadata["variables"].tree
        except Exception as e:
            raise CorruptBackboneError(f"load_backbone: the array metadata of {path} is unreadable "
                                       f"({type(e).__name__}: {e}).") from e
        like = flax.core.unfreeze(like)
        _check_stored_like(stored, like, path)
        abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(*_spec(leaf)), like)
        try:
            host = checkpointer.restore(path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # tensorstore reports damaged chunks as DATA_LOSS, OUT_OF_RANGE, ...
            raise CorruptBackboneError(f"load_backbone: the arrays of {path} are unreadable "
                                       f"({type(e).__name__}: {e}).") from e
    finally:
        checkpointer.close()
    host = jax.tree.map(np.asarray, host["variables"])
    found = fingerprint_lib.fingerprint(host)
    if found != expected:
        raise CorruptBackboneError(f"load_backbone: the arrays of {path} have content fingerprint {found}, but were "
                                   f"saved with {expected}: the files were changed since they were written.")
    return jax.tree.map(jnp.asarray, host), ids


def check_disjoint(train_ids, forgettable_ids) -> None:
    """Refuses a backbone trained on any forgettable id: SAFE never retrains the backbone, so deleting such an id
    would leave its influence in every prediction.

    Args:
      train_ids: the ids the backbone was trained on (from :func:`load_backbone`).
      forgettable_ids: the ids a request may name.

    Raises:
      BackboneDataError: the sets intersect (the count and the first few are named), or ``train_ids`` is ``None``.

    Examples:
      >>> check_disjoint([0, 1, 2], [3, 4])
      >>> try:
      ...     check_disjoint([0, 1, 2], [2, 1, 7])
      ... except BackboneDataError as e:
      ...     print(str(e).partition(". ")[0])
      The backbone was trained on 2 forgettable id(s): [1, 2]
    """
    train = _train_ids(train_ids, "check_disjoint")
    both = np.intersect1d(train, np.asarray(forgettable_ids, np.int64))
    if both.size:
        more = ", ..." if both.size > 5 else ""
        raise BackboneDataError(
            f"The backbone was trained on {both.size} forgettable id(s): [{', '.join(map(str, both[:5]))}{more}]. "
            "A deletion never retrains the backbone, so it must see none of them: train it on core data only, "
            "or on other data entirely."
        )
