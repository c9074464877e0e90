"""Retrain oracles: a content-addressed, atomically written cache, and a helper to train populations.

Every jaxforget readout is judged against a model retrained from scratch on ``D_r`` (``specs/evaluation.md``
§2). Oracles are expensive (the distributional metrics of §7–§8 want 16–512 of them), so they are trained
once and cached under a key that hashes *everything* that determines them: the dataset, the sorted forget
ids, the model and training configs, the seed list, ``n_models`` and the version of the training code.

The cache is model-agnostic. An :class:`OracleEntry` holds any params pytree (leading axis ``n_models`` on
every leaf), per-split logits of every oracle, per-model accuracies and training times, and a JSON ``meta``
record. On disk an entry is one directory::

    <directory>/<key>/arrays/     orbax StandardCheckpointer: params, logits, accuracies, train_seconds
    <directory>/<key>/entry.json  sidecar: key, n_models, leaf shapes/dtypes, size and SHA-256 of every
                                  file under arrays/, meta

It is written to a hidden temporary directory next to the target and renamed into place only when complete,
so a crash (or an exception in training or saving) never leaves a partial entry. Loading never retrains over
a bad entry: a missing or unreadable sidecar, or an array file whose size or SHA-256 differs from the
sidecar's, raises :class:`OracleCacheError` naming the path; so does a model count other than the requested
one, as the DeepMind evaluator asserts.

The cache is written by one process (the launcher, or process 0 of a multi-host job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from jaxforget import checkpoint, errors, report, timing

PyTree = Any

#: Bumped when the key payload or the on-disk layout changes, so old entries are never misread.
CACHE_FORMAT = 1

_SIDECAR = "entry.json"
_ARRAYS = "arrays"
_KEY_RE = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z_.-]*$")


class OracleCacheError(errors.JaxForgetError, RuntimeError):
    """An oracle cache entry that exists but cannot be used: unreadable, corrupt or of the wrong size."""


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def _canonical(obj: Any, where: str) -> Any:
    """A JSON-able, order-independent copy: mappings with string keys, lists, Python scalars."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cache_key: {where} has a value of type {type(obj).__name__} that has no canonical JSON form.")


def _sorted_ids(ids) -> list[int]:
    arr = np.asarray(ids)
    if arr.size == 0:
        return []
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise errors.ShapeDtypeError(f"cache_key: forget_ids must be a 1-D integer array, got {arr.dtype}{arr.shape}.")
    return [int(i) for i in np.unique(arr)]


def cache_key(
    *,
    dataset_fingerprint: str,
    forget_ids,
    model_config: Mapping[str, Any],
    train_config: Mapping[str, Any],
    seeds: Sequence[int],
    n_models: int,
    code_version: str,
) -> str:
    """SHA-256 hex digest that names an oracle population (§2).

    The payload is canonical JSON (keys sorted, no whitespace) of the arguments, with the forget ids as a sorted
    set of ints (their order and repeats do not matter: ``D_r`` is the same), mappings (and ``ConfigDict``) as
    dicts with sorted keys, tuples and arrays as lists. The seed list keeps its order, because it fixes which
    oracle sits at which index. :data:`CACHE_FORMAT` is part of the payload.

    Args:
      dataset_fingerprint: :func:`dataset_fingerprint` of the training set ``D``.
      forget_ids: ``[k]`` integer ids of ``D_f`` (the union of all requests so far).
      model_config: architecture config (any JSON-able mapping).
      train_config: optimiser, schedule, batch size, epochs, ... (any JSON-able mapping).
      seeds: one seed per oracle (normally ``0..n_models−1``).
      n_models: the number of oracles.
      code_version: version of the training code (e.g. ``jaxforget.__version__`` plus a recipe tag).

    Returns:
      64 lowercase hex characters.

    Raises:
      ShapeDtypeError: non-integer forget ids. TypeError: a config value with no JSON form.
      ValueError: ``n_models < 1``.

    Examples:
      >>> k = cache_key(dataset_fingerprint="d", forget_ids=[3, 1], model_config={}, train_config={"lr": 0.1},
      ...               seeds=[0], n_models=1, code_version="0.1.0")
      >>> k == cache_key(dataset_fingerprint="d", forget_ids=[1, 3], model_config={}, train_config={"lr": 0.1},
      ...                seeds=[0], n_models=1, code_version="0.1.0"), len(k)
      (True, 64)
    """
    if int(n_models) != n_models or n_models < 1:
        raise ValueError(f"cache_key: n_models must be an integer >= 1, got {n_models}.")
    payload = {
        "format": CACHE_FORMAT,
        "dataset": str(dataset_fingerprint),
        "forget_ids": _sorted_ids(forget_ids),
        "model_config": _canonical(model_config, "model_config"),
        "train_config": _canonical(train_config, "train_config"),
        "seeds": [int(s) for s in seeds],
        "n_models": int(n_models),
        "code_version": str(code_version),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _hash_array(h, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise errors.ShapeDtypeError(f"{name} has dtype object, which has no stable byte form.")
    h.update(f"{name}|{arr.dtype.name}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(memoryview(arr).cast("B") if arr.size else b"")


def dataset_fingerprint(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> str:
    """SHA-256 hex digest of a dataset's inputs, labels and ids, including their shapes and dtypes.

    Args:
      x: ``[n, ...]`` inputs.
      y: ``[n]`` labels.
      ids: ``[n]`` stable sample ids.

    Raises:
      ShapeDtypeError: the three arrays disagree on ``n`` (all shapes are named), or an object dtype.

    Examples:
      >>> a = dataset_fingerprint(np.zeros((2, 3), np.float32), np.array([0, 1]), np.array([10, 11]))
      >>> a == dataset_fingerprint(np.zeros((2, 3), np.float32), np.array([0, 1]), np.array([10, 12]))
      False
    """
    x, y, ids = np.asarray(x), np.asarray(y), np.asarray(ids)
    if x.ndim < 1 or y.shape[:1] != x.shape[:1] or ids.shape[:1] != x.shape[:1]:
        raise errors.ShapeDtypeError(
            f"dataset_fingerprint: x {x.shape}, y {y.shape} and ids {ids.shape} must share the leading axis."
        )
    h = hashlib.sha256()
    for name, arr in (("x", x), ("y", y), ("ids", ids)):
        _hash_array(h, name, arr)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OracleEntry:
    """The cached outputs of ``n_models`` retrain oracles.

    Attributes:
      params: any pytree whose every leaf has leading axis ``n_models`` (the stacked oracles), or ``None``
        when only their outputs are cached.
      logits: split name -> ``[n_models, n, K]`` eval-mode logits, stored as float32 (§0.4).
      accuracies: split name -> ``[n_models]`` accuracies in [0, 1] (NaN for an empty split).
      train_seconds: ``[n_models]`` training wall time of each oracle (the ``T_retrain`` of §9).
      meta: JSON-able record (recipe details, subsample seeds, ...). It round-trips through JSON: tuples come
        back as lists and NaN/Inf as ``None`` (:func:`jaxforget.report.write_json`).

    Construction converts the arrays to host numpy (logits float32, the rest float64) and checks that every
    array agrees on ``n_models``; it raises :class:`~jaxforget.errors.ShapeDtypeError` (or ``NonFiniteError``
    for NaN/Inf logits, ``ValueError`` for accuracies outside [0, 1], ``TypeError`` for a non-JSON ``meta``)
    otherwise. ``params`` are left where they are (device arrays stay on device until saved).
    """

    params: PyTree | None
    logits: dict[str, np.ndarray]
    accuracies: dict[str, np.ndarray]
    train_seconds: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        ts = np.asarray(self.train_seconds, np.float64)
        if ts.ndim != 1 or ts.size < 1:
            raise errors.ShapeDtypeError(f"OracleEntry: train_seconds must have shape [n_models >= 1], got {ts.shape}.")
        n = ts.shape[0]
        self.train_seconds = ts
        logits = {}
        for split, z in dict(self.logits).items():
            z = np.asarray(z)
            if not np.issubdtype(z.dtype, np.floating):
                raise errors.ShapeDtypeError(f"OracleEntry: logits[{split!r}] must be floating, got {z.dtype}.")
            if z.ndim != 3 or z.shape[0] != n:
                raise errors.ShapeDtypeError(
                    f"OracleEntry: logits[{split!r}] has shape {z.shape}, expected [n_models={n}, n, K] "
                    f"(n_models from train_seconds {ts.shape})."
                )
            errors.check_finite(z, f"oracle logits[{split!r}]")
            logits[str(split)] = z.astype(np.float32)
        self.logits = logits
        accs = {}
        for split, a in dict(self.accuracies).items():
            a = np.asarray(a, np.float64)
            if a.shape != (n,):
                raise errors.ShapeDtypeError(
                    f"OracleEntry: accuracies[{split!r}] has shape {a.shape}, expected ({n},) "
                    f"(n_models from train_seconds {ts.shape})."
                )
            if ((a < 0) | (a > 1)).any():  # NaN (an empty split) compares False and passes
                raise ValueError(f"OracleEntry: accuracies[{split!r}] must be fractions in [0, 1], got {a}.")
            accs[str(split)] = a
        self.accuracies = accs
        if self.params is not None:
            for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
                shape = np.shape(leaf)
                if not shape or shape[0] != n:
                    raise errors.ShapeDtypeError(
                        f"OracleEntry: params leaf {jax.tree_util.keystr(path)} has shape {shape}, expected a "
                        f"leading axis of n_models={n} (from train_seconds {ts.shape})."
                    )
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"OracleEntry: meta must be JSON-serialisable: {e}") from e

    @property
    def n_models(self) -> int:
        """The number of oracles in the entry."""
        return int(self.train_seconds.shape[0])


def _arrays_tree(entry: OracleEntry) -> dict:
    """What orbax stores: host numpy only, so an entry restores on any device (or none)."""
    tree = {"logits": entry.logits, "accuracies": entry.accuracies, "train_seconds": entry.train_seconds}
    if entry.params is not None:
        tree["params"] = jax.tree.map(np.asarray, entry.params)
    return tree


def _file_manifest(root: str) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root``.

    Checked *before* orbax reads anything: a damaged file is then named precisely, and orbax's concurrent
    reads never start on it (they would fail part-way, each with its own error).
    """
    return {name: {"size": os.path.getsize(os.path.join(root, name)), "sha256": digest}
            for name, digest in checkpoint.tree_files(root).items()}


def _leaf_specs(tree: PyTree) -> list[dict]:
    return [{"shape": list(np.shape(leaf)), "dtype": np.asarray(leaf).dtype.name} for leaf in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


class OracleCache:
    """Oracle entries by key under ``directory`` (created on first save).

    Args:
      directory: the cache root; one sub-directory per key. Hidden ``.tmp-*`` directories are in-progress
        (or crashed) writes and are never read.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))

    def path(self, key: str) -> str:
        """The directory of entry ``key`` (whether or not it exists)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"OracleCache: invalid key {key!r} (letters, digits, '_', '-', '.'; no leading '.').")
        return os.path.join(self.directory, key)

    # ------------------------------------------------------------------ load

    def load(self, key: str, n_models: int, *, params_like: PyTree | None = None) -> OracleEntry | None:
        """The entry under ``key``, or ``None`` when there is none.

        Args:
          key: from :func:`cache_key`.
          n_models: the requested number of oracles; a different stored count raises.
          params_like: optional pytree of **one** model's params (arrays or ``jax.ShapeDtypeStruct``); the
            params are then restored into its structure with a leading ``n_models`` axis. Without it they come
            back as orbax restores them (nested dicts and lists of numpy arrays).

        Raises:
          OracleCacheError: the entry exists but is unreadable or corrupt (the path is named), or holds a
            different number of models.
          ShapeDtypeError: ``params_like`` does not match the stored leaf shapes and dtypes.
        """
        path = self.path(key)
        if not os.path.lexists(path):
            return None
        sidecar = os.path.join(path, _SIDECAR)
        try:
            with open(sidecar, encoding="utf-8") as f:
                info = json.load(f)
            stored_n = int(info["n_models"])
            stored_key, fmt, files = info["key"], int(info["format"]), dict(info["files"])
            params_specs, meta = info["params_leaves"], info["meta"]
            logits_shapes, accuracy_splits = dict(info["logits_shapes"]), list(info["accuracy_splits"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OracleCacheError(
                f"Oracle cache entry {path} is unreadable ({sidecar}: {type(e).__name__}: {e}). "
                "It is not retrained over: delete the directory to retrain."
            ) from e
        if stored_key != key or fmt != CACHE_FORMAT:
            raise OracleCacheError(
                f"Oracle cache entry {path} records key {stored_key!r} and format {fmt}, expected {key!r} and "
                f"format {CACHE_FORMAT}. Delete the directory to retrain."
            )
        if stored_n != n_models:
            raise OracleCacheError(
                f"Oracle cache entry {path} holds {stored_n} models, but {n_models} were requested "
                "(the model count is part of the key, so the entry or the key is wrong)."
            )
        arrays = os.path.join(path, _ARRAYS)
        try:
            found = _file_manifest(arrays) if os.path.isdir(arrays) else {}
        except OSError as e:
            raise OracleCacheError(f"Oracle cache entry {path} is unreadable ({type(e).__name__}: {e}).") from e
        for name in sorted(set(files) | set(found)):
            if files.get(name) != found.get(name):
                what = "is missing" if name not in found else "is unexpected" if name not in files else "has changed"
                raise OracleCacheError(
                    f"Oracle cache entry {path} is corrupt: file {os.path.join(arrays, name)} {what} since it was "
                    f"written (size or SHA-256 differs from {sidecar}). Delete the directory to retrain."
                )
        target = None
        if params_like is not None:
            if params_specs is None:
                raise errors.ShapeDtypeError(f"params_like was given, but entry {path} stores no params.")
            leaves, treedef = jax.tree.flatten(params_like)
            want = [{"shape": [stored_n, *np.shape(leaf)], "dtype": np.dtype(leaf.dtype).name} for leaf in leaves]
            if want != params_specs:
                raise errors.ShapeDtypeError(
                    f"params_like (with the leading n_models axis) has leaves {want}, entry {path} stores "
                    f"{params_specs}."
                )
            # A full target (shapes from the sidecar) so that one restore gives the caller's params structure.
            target = {
                "logits": {k: np.zeros(v, np.float32) for k, v in logits_shapes.items()},
                "accuracies": {k: np.zeros((stored_n,), np.float64) for k in accuracy_splits},
                "train_seconds": np.zeros((stored_n,), np.float64),
                # np.zeros is lazily allocated by the OS: no real cost before orbax fills it.
                "params": jax.tree.unflatten(treedef, [np.zeros((stored_n, *np.shape(x)), x.dtype) for x in leaves]),
            }
        try:
            checkpointer = ocp.StandardCheckpointer()
            try:
                raw = checkpointer.restore(arrays, target)
            finally:
                checkpointer.close()
        except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
            raise OracleCacheError(
                f"Oracle cache entry {path} is unreadable ({type(e).__name__}: {e}). "
                "It is not retrained over: delete the directory to retrain."
            ) from e
        raw = dict(raw)
        try:
            return OracleEntry(
                params=raw.get("params"),
                logits=dict(raw.get("logits", {})),
                accuracies=dict(raw.get("accuracies", {})),
                train_seconds=raw["train_seconds"],
                meta=meta,
            )
        except (errors.JaxForgetError, TypeError, KeyError) as e:
            raise OracleCacheError(f"Oracle cache entry {path} is inconsistent: {e}") from e

    # ------------------------------------------------------------------ save

    def save(self, key: str, entry: OracleEntry) -> str:
        """Writes ``entry`` under ``key`` atomically and returns its path.

        The arrays (orbax) and the sidecar go to a hidden temporary directory in the cache root, which is then
        renamed to the entry path: readers see either no entry or a complete one. An existing entry under the
        same key is replaced (keys are content addresses, so both describe the same oracles).
        """
        path = self.path(key)
        os.makedirs(self.directory, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.directory)
        try:
            tree = _arrays_tree(entry)
            checkpointer = ocp.StandardCheckpointer()
            try:
                checkpointer.save(os.path.join(tmp, _ARRAYS), tree)
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()
            info = {
                "format": CACHE_FORMAT,
                "key": key,
                "n_models": entry.n_models,
                "splits": sorted(entry.logits),
                "logits_shapes": {k: list(v.shape) for k, v in entry.logits.items()},
                "accuracy_splits": sorted(entry.accuracies),
                "params_leaves": _leaf_specs(tree["params"]) if "params" in tree else None,
                "files": _file_manifest(os.path.join(tmp, _ARRAYS)),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "meta": entry.meta,
            }
            report.write_json(info, os.path.join(tmp, _SIDECAR))
            self._swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _swap_in(self, tmp: str, path: str) -> None:
        """Renames ``tmp`` to ``path``; an existing entry is moved aside first and removed after."""
        old = None
        if os.path.lexists(path):
            old = os.path.join(self.directory, f".tmp-old-{uuid.uuid4().hex}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None and not os.path.lexists(path):
                os.replace(old, path)  # put the previous entry back
                old = None
            if not os.path.lexists(path):
                raise
            # Another process renamed an entry for the same key in between: keep it (same content address).
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ get or train

    def get_or_train(
        self,
        key: str,
        n_models: int,
        train_fn: Callable[[], OracleEntry],
        *,
        params_like: PyTree | None = None,
    ) -> tuple[OracleEntry, dict[str, Any]]:
        """Loads the entry under ``key``, or calls ``train_fn()`` once, saves its result and returns it.

        Args:
          key: from :func:`cache_key`.
          n_models: the requested number of oracles; ``train_fn``'s entry must hold exactly that many.
          train_fn: trains the oracles in this process (§2: same run, same devices) and returns the entry.
          params_like: see :meth:`load`.

        Returns:
          ``(entry, info)`` with ``info = {"key", "source": "trained" | "loaded", "seconds", "path"}``.
          ``seconds`` is this call's wall time: training plus saving, or loading. The oracle training time
          ``T_retrain`` of §9 is ``entry.train_seconds`` either way.

        Raises:
          OracleCacheError: see :meth:`load`; also when ``train_fn`` returns the wrong number of models (nothing
            is saved then). Whatever ``train_fn`` raises propagates, and nothing is saved.
        """
        start = time.perf_counter()
        entry = self.load(key, n_models, params_like=params_like)
        if entry is not None:
            return entry, {"key": key, "source": "loaded", "seconds": time.perf_counter() - start,
                           "path": self.path(key)}
        entry = train_fn()
        if not isinstance(entry, OracleEntry):
            raise TypeError(f"get_or_train: train_fn must return an OracleEntry, got {type(entry).__name__}.")
        if entry.n_models != n_models:
            raise OracleCacheError(
                f"get_or_train: train_fn returned {entry.n_models} models for key {key}, expected {n_models}; "
                "nothing was saved."
            )
        jax.block_until_ready(entry.params)
        path = self.save(key, entry)
        return entry, {"key": key, "source": "trained", "seconds": time.perf_counter() - start, "path": path}


# --------------------------------------------------------------------------------------------------
# Retrain oracles of a method (through the method contract only)
# --------------------------------------------------------------------------------------------------


def eval_sets(splits, forgotten_ids) -> dict:
    """``{"forget", "retain", "test"}`` datasets for a state that forgot ``forgotten_ids`` (all requests so far)."""
    train = splits.train
    forgotten = np.sort(np.asarray(forgotten_ids, np.int64))
    return {"forget": train.subset(forgotten), "retain": train.subset(np.setdiff1d(train.ids, forgotten)),
            "test": splits.test}


def flat_params(tree: PyTree) -> np.ndarray:
    """All leaves of a parameter pytree as one host float64 vector (leaf order of ``jax.tree.leaves``)."""
    leaves = [np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0, np.float64)


def method_key(method, state, *, sets: Mapping, seeds: Sequence[int], n_models: int, tag: str) -> str:
    """The cache key of ``n_models`` retrains of ``method`` on ``state``'s retained data, read out on ``sets``.

    It hashes the training set and the evaluation sets' contents, the forgotten ids, what determines the method's
    retrain (its config part :meth:`~jaxforget.methods.base.Method.retrain_key`, so that methods sharing it share
    oracles, and its state part :meth:`~jaxforget.methods.base.Method.retrain_inputs`, e.g. mixed-linear's core),
    the layout of the method's state (an entry holds a retrained state), the seeds, the model count, the jaxforget
    version and ``tag`` (the population's recipe).
    """
    import jaxforget  # pylint: disable=import-outside-toplevel

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(method.retrain_inputs(state)):
        _hash_array(h, "input", np.asarray(leaf))
    # The state's layout: an entry holds a retrained state, readable only into the structure it was saved from.
    layout = jax.eval_shape(lambda: serialization.to_state_dict(method.abstract_state()))
    h.update(repr(jax.tree.map(lambda a: (a.shape, str(a.dtype)), layout)).encode())
    fingerprint = ":".join([method.splits.train.fingerprint(), h.hexdigest()]
                           + [f"{k}={sets[k].fingerprint()}" for k in sorted(sets)])
    return cache_key(dataset_fingerprint=fingerprint, forget_ids=method.forgotten_ids(state),
                     model_config=method.retrain_key(), train_config={"tag": tag}, seeds=list(seeds),
                     n_models=n_models, code_version=jaxforget.__version__)


def population_entry(method, states: Sequence, seconds: Sequence[float], sets: Mapping, meta: dict | None = None
                     ) -> OracleEntry:
    """An :class:`OracleEntry` of trained states: flat float64 params, logits and accuracies on the non-empty
    ``sets`` (orbax stores no empty arrays; an empty set has no logits to compare)."""
    sets = {name: ds for name, ds in sets.items() if len(ds)}
    logits = {name: np.stack([np.asarray(method.predict(s, ds.x)) for s in states]) for name, ds in sets.items()}
    accs = {name: np.array([_accuracy(z, sets[name].y) for z in v]) for name, v in logits.items()}
    return OracleEntry(params={"flat": np.stack([flat_params(method.params(s)) for s in states])}, logits=logits,
                       accuracies=accs, train_seconds=np.asarray(seconds, np.float64), meta=meta or {})


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if len(labels) else float("nan")


def retrain_oracle(method, state, *, cache: OracleCache | None, sets: Mapping, seed: int = 0
                   ) -> tuple[OracleEntry, dict, Any]:
    """The gold standard for ``state``: ``method.retrain(state)`` (timed in this process), or its cached entry.

    Returns:
      ``(entry, info, retrained)``: the entry holds the retrain's flat float64 params (``entry.params["flat"][0]``),
      its logits and accuracies on ``sets`` and its training time (``entry.train_seconds[0]``, recorded when it was
      trained, compilation excluded; ``entry.meta["compile_seconds"]`` holds that apart); ``info`` is
      :meth:`OracleCache.get_or_train`'s (``source`` "trained" or "loaded"); ``retrained`` is
      the retrained state itself (restored into the method's state structure when loaded, its arrays keeping the
      dtypes they were saved with).
    """
    retrained = None

    def train_fn():
        nonlocal retrained
        compiles = timing.CompileCounter()  # compilation is reported apart from the retrain's time (spec §9)
        start = time.perf_counter()
        with compiles:
            retrained = jax.block_until_ready(method.retrain(state))
        seconds = time.perf_counter() - start - compiles.seconds
        # The forgotten ids say which deletions the entry honours (a workdir's verify checks its cache with them).
        entry = population_entry(method, [retrained], [seconds], sets, meta={
            "compile_seconds": compiles.seconds, "forgotten_ids": method.forgotten_ids(state).tolist()})
        entry.params["state"] = jax.tree.map(lambda a: np.asarray(a)[None], serialization.to_state_dict(retrained))
        return entry

    if cache is None:
        start = time.perf_counter()
        entry = train_fn()
        info = {"key": None, "source": "trained", "seconds": time.perf_counter() - start, "path": None}
        return entry, info, retrained
    key = method_key(method, state, sets=sets, seeds=[seed], n_models=1, tag="retrain")
    entry, info = cache.get_or_train(key, 1, train_fn)
    if retrained is None:  # loaded: the saved state dict into the method's structure
        one = jax.tree.map(lambda a: np.asarray(a)[0], dict(entry.params["state"]))
        retrained = serialization.from_state_dict(method.abstract_state(), one)
    return entry, info, retrained


# --------------------------------------------------------------------------------------------------
# Training a population
# --------------------------------------------------------------------------------------------------


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """``[len(seeds)]`` typed PRNG keys, key ``i`` equal to ``jax.random.key(seeds[i])``.

    Examples:
      >>> seed_keys([0, 1]).shape
      (2,)
    """
    if len(seeds) == 0:
        raise ValueError("seed_keys: no seeds.")
    data = jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])
    return jax.random.wrap_key_data(data)


def train_population(
    train_one: Callable[[jax.Array], PyTree],
    seeds: Sequence[int],
    *,
    vectorize: bool = True,
    batch_size: int | None = None,
) -> PyTree:
    """Trains one model per seed and stacks them: every output leaf gains a leading ``[len(seeds)]`` axis.

    ``train_one(key)`` must derive *all* of a model's randomness (init, data order, noise) from ``key``, so
    that oracle ``i`` depends on ``seeds[i]`` alone (§2: seeds ``0..n_models−1``, each with its own init and
    data order) and the vectorised and looped paths agree up to float reassociation.

    Args:
      train_one: ``key -> pytree`` (params, and anything else per model, e.g. logits).
      seeds: one integer seed per model; model ``i`` gets ``jax.random.key(seeds[i])``.
      vectorize: ``True``: ``jit(vmap(train_one))`` over the keys, one compiled program for the population
        (``train_one`` must be traceable). ``False``: a Python loop of ``train_one`` calls, then ``jnp.stack``.
      batch_size: with ``vectorize``, train ``batch_size`` models at a time (``jax.lax.map``) to bound memory;
        ``None`` trains all at once.

    Returns:
      The stacked pytree.
    """
    keys = seed_keys(seeds)
    if vectorize:
        if batch_size is None or batch_size >= len(seeds):
            return jax.jit(jax.vmap(train_one))(keys)
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"train_population: batch_size must be an integer >= 1, got {batch_size}.")
        return jax.jit(lambda k: jax.lax.map(train_one, k, batch_size=int(batch_size)))(keys)
    outs = [train_one(keys[i]) for i in range(len(seeds))]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


__all__ = [
    "CACHE_FORMAT",
    "OracleCache",
    "OracleCacheError",
    "OracleEntry",
    "cache_key",
    "dataset_fingerprint",
    "seed_keys",
    "train_population",
]
