"""The method contract: what every unlearning method (and every baseline) implements, and nothing more.

The harness (the forget job, the comparison, the benchmark, oracles, reports and the train / forget / evaluate
workflow) reaches a method only through this contract and the registry (:mod:`jaxforget.methods`):

* ``init(key) -> State``: train the original model from the method's config on its data;
* ``forget(state, ids, *, key=None) -> (State, ForgetInfo)``: serve one deletion request;
* ``predict(state, x) -> logits``: eval-mode logits ``[n, K]`` of the published model;
* ``retrain(state, key=None) -> State``: the gold standard, the same recipe from scratch on the state's retained
  data (a method may override it with an exact fast path, as mixed-linear's float64 solve does);
* ``params(state)``: the parameters weight distances compare; ``abstract_state()``: the structure, shapes and
  dtypes a checkpoint restores into.

``State`` is a pytree (a ``flax.struct`` dataclass) that holds *everything* a later request needs, its deletion
:class:`Ledger` included, so a restored state forgets exactly like the live one. A method may keep caches that
only save time; they are keyed by content (never by object identity alone) and documented where they live.

Optional hooks have working defaults (a loop, a no-op); a method overrides them where it can do better:
``init_population`` / ``retrain_population`` (populations for distributional scores), ``publish`` (the output
randomisation of a noisy mechanism), ``fit`` / ``mean_loss`` (relearn time), ``baselines`` / ``run_baseline`` (timed
retrain recipes beside the gold standard), ``warm_up``, ``readouts`` (method-specific report fields) and
``retrain_key`` (what determines the retrain, so that methods sharing it share cached oracles and originals).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxforget import data as data_lib
from jaxforget import errors, ledger
from jaxforget import mesh as mesh_lib

PyTree = Any
State = Any


@struct.dataclass
class Ledger:
    """The deletion ledger every state carries.

    Attributes:
      removed_by: ``int32[n_train]``; ``0`` for a retained sample, ``k`` if request ``k`` (1-based) removed it.
        Positions follow the method's training set (sorted ids).
      num_requests: ``int32[]`` requests served so far.
      data: ``uint32[8]`` the SHA-256 of the data and config the state was made on (:func:`data_binding`): the
        training set's ids and contents, the protected ids and the method's model-defining config, so that a state is
        never read through another split or by a method configured to make other models.
    """

    removed_by: jax.Array
    num_requests: jax.Array
    data: jax.Array

    @classmethod
    def empty(cls, num_train: int, data: np.ndarray | None = None) -> Ledger:
        """A ledger of ``num_train`` samples with nothing removed, bound to ``data`` (zeros: unbound)."""
        data = np.zeros(8, np.uint32) if data is None else np.asarray(data, np.uint32)
        return cls(removed_by=ledger.new_ledger(num_train), num_requests=jnp.zeros((), jnp.int32),
                   data=jnp.asarray(data))

    def record(self, positions: np.ndarray) -> Ledger:
        """The ledger after one more request that removes ``positions``."""
        request = int(self.num_requests) + 1
        return Ledger(removed_by=ledger.record(self.removed_by, positions, request),
                      num_requests=jax.device_put(np.int32(request)),  # explicit: requests run under a transfer guard
                      data=self.data)

    def retain_mask(self) -> np.ndarray:
        """``bool[n_train]``: True for retained samples."""
        return ledger.retain_mask(self.removed_by)


def data_binding(splits: data_lib.Splits, protected_ids: np.ndarray, definition: dict | None = None) -> np.ndarray:
    """``uint32[8]``: SHA-256 of the training set's content key (ids, inputs, labels), the protected ids and the
    method's ``definition`` (its :meth:`Method.state_key`: the model and the config fields that make a state)."""
    h = hashlib.sha256(b"jaxforget.ledger.data/v2")
    h.update(splits.train.fingerprint().encode())
    h.update(np.asarray(np.sort(protected_ids), "<i8").tobytes())
    h.update(json.dumps(definition or {}, sort_keys=True, default=repr).encode())
    return np.frombuffer(h.digest(), "<u4").astype(np.uint32)


@dataclasses.dataclass(frozen=True)
class ForgetInfo:
    """Host-side diagnostics of one forget request, the same record for every method.

    Attributes:
      request: 1-based request number.
      num_forgotten: samples this request removed.
      num_retained: training samples retained after it.
      seconds: wall time of the request (after any warm-up, ``block_until_ready``).
      passes: passes over the data the request made, in units of one pass over the retained set (gradient or
        curvature products, epochs of fine-tuning); 0 for a request that reads no data.
      solver: what served the request (e.g. ``"direct-primal"``, ``"cg"``, ``"finetune"``).
      iterations: solver iterations or optimiser steps.
      residual: the method's own measure of what the request left undone (e.g. mixed-linear's relative gradient
        residual; 0 for a forget that is exactly the gold standard), or ``None`` for a method with no such measure
        (its forgetting is unmeasured; the workflow's residual budget counts it as exhausted).
      sigma: std of the noise added to the published parameters (0: none).
      notes: method-specific JSON-able details.
      noiseless: the state before noise, for evaluation only (publishing it would undo the noise); ``None`` when
        no noise was added.
    """

    request: int
    num_forgotten: int
    num_retained: int
    seconds: float
    passes: float
    solver: str
    iterations: int = 0
    residual: float | None = None
    sigma: float = 0.0
    notes: dict = dataclasses.field(default_factory=dict)
    noiseless: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "noiseless"} | {"notes": dict(self.notes)}


class Method(abc.ABC):
    """Base of every method: the data it was built on, request validation, and the contract.

    Args:
      model: an unbound flax module (``models.get_model``).
      splits: the dataset split (``train`` = the training set ``D`` with stable ids, ``test``).
      config: the method's section of a job config (``config.method``), validated by :meth:`validate_config`.
      mesh: the data-parallel device mesh (all devices by default).

    Subclasses set :attr:`name` and implement the abstract methods.
    """

    #: Registry name.
    name: ClassVar[str] = ""
    #: Whether ``forget`` reads retained data (instance-wise methods may not; baselines that do are marked).
    uses_retained_data: ClassVar[bool] = True

    def __init__(self, model: nn.Module, splits: data_lib.Splits, config: ml_collections.ConfigDict, *,
                 mesh: jax.sharding.Mesh | None = None):
        self.validate_config(config)
        self.config = config
        self.splits = splits
        self.model = model
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
        self.train_ids = np.asarray(splits.train.ids)
        self.num_train = len(self.train_ids)
        self.num_classes = int(splits.train.num_classes)

    # ------------------------------------------------------------------ config

    @classmethod
    @abc.abstractmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """Every field of the method's config, with defaults (``name`` included)."""

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        """Raises :class:`~jaxforget.errors.ConfigError` naming the first invalid or unknown field."""
        validate_fields(config, cls.default_config(), f"method {cls.name!r}")

    # ------------------------------------------------------------------ data and requests

    def forgettable_ids(self) -> np.ndarray:
        """Ids a request may name (the whole training set unless a method protects some)."""
        return np.setdiff1d(self.train_ids, self.protected_ids())

    def protected_ids(self) -> np.ndarray:
        """Ids that can never be forgotten (mixed-linear's core); requests naming them raise ``CoreIdsError``."""
        return np.zeros(0, np.int64)

    @functools.cached_property
    def data_binding(self) -> np.ndarray:
        """``uint32[8]`` the data this method's states are bound to (:func:`data_binding`)."""
        return data_binding(self.splits, self.protected_ids(), self.state_key())

    def empty_ledger(self) -> Ledger:
        """A ledger of this method's training set with nothing removed, bound to its data."""
        return Ledger.empty(self.num_train, self.data_binding)

    def check_state(self, state: State) -> None:
        """Raises a named error for a state whose ledger does not fit this method's training set.

        Raises:
          ShapeDtypeError: a ledger of another size. StateMismatchError: a state made on other data (another
            dataset, split or core), even of the same size.
        """
        removed_by = np.asarray(state.ledger.removed_by)
        if removed_by.shape != (self.num_train,):
            raise errors.ShapeDtypeError(
                f"The state's ledger covers {removed_by.shape} samples, but method {self.name!r} was built on a "
                f"training set of {self.num_train}: the state comes from another dataset or split.")
        bound = np.asarray(state.ledger.data, np.uint32)
        if not np.array_equal(bound, self.data_binding):
            raise errors.StateMismatchError(
                f"The state was made on data and config {_hex(bound)}, but method {self.name!r} was built on "
                f"{_hex(self.data_binding)} (training ids, inputs, labels, protected ids, and the model and the config "
                "fields that make a state, Method.state_key): the state comes from another dataset, split, core or "
                "model config; using it here would forget the wrong samples or the wrong model.")

    def validate_request(self, state: State, ids) -> np.ndarray:
        """Checks a request against the training set, the protected ids and the ledger; returns positions.

        Raises:
          EmptyRequestError, ShapeDtypeError, DuplicateIdsError, UnknownIdsError, CoreIdsError,
          AlreadyForgottenError.
        """
        self.check_state(state)
        return ledger.validate(state.ledger.removed_by, self.train_ids, self.protected_ids(), ids)

    def retained_positions(self, state: State) -> np.ndarray:
        """Positions (into the training set) of the samples the state retains."""
        return np.flatnonzero(state.ledger.retain_mask())

    def forgotten_ids(self, state: State) -> np.ndarray:
        """Ids every request so far removed."""
        return ledger.forgotten_ids(state.ledger.removed_by, self.train_ids)

    def with_ledger(self, state: State, new_ledger: Ledger) -> State:
        """``state`` with another ledger (evaluation helpers; no forgetting happens)."""
        return state.replace(ledger=new_ledger)

    def check_inputs(self, x) -> np.ndarray:
        """Host float images ``[n, H, W, C]`` of the training set's shape; named errors otherwise."""
        x = np.asarray(x)
        expected = tuple(self.splits.train.x.shape[1:])
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise errors.ShapeDtypeError(f"Inputs must have shape [n, {', '.join(map(str, expected))}], got {x.shape}.")
        if not np.issubdtype(x.dtype, np.floating):
            raise errors.ShapeDtypeError(f"Inputs must be float images in [0, 1], got dtype {x.dtype}.")
        errors.check_finite(x, "inputs x")
        return x

    # ------------------------------------------------------------------ the contract

    @abc.abstractmethod
    def init(self, key: jax.Array) -> State:
        """Trains the original model on the whole training set; the ledger is empty."""

    @abc.abstractmethod
    def forget(self, state: State, ids, *, key: jax.Array | None = None) -> tuple[State, ForgetInfo]:
        """Forgets ``ids``. Validates first; on any error the given state is untouched and nothing is returned."""

    @abc.abstractmethod
    def predict(self, state: State, x) -> jax.Array:
        """Eval-mode logits ``[n, K]`` of the published model on images ``x: [n, H, W, C]``."""

    @abc.abstractmethod
    def retrain(self, state: State, key: jax.Array | None = None) -> State:
        """The gold standard: the recipe from scratch on the state's retained data (same ledger)."""

    @abc.abstractmethod
    def params(self, state: State) -> PyTree:
        """The parameters that weight distances compare (for a retrain, the same structure)."""

    @abc.abstractmethod
    def abstract_state(self) -> State:
        """A state with the structure, shapes and dtypes of every state of this method (a restore target)."""

    # ------------------------------------------------------------------ optional hooks

    def retrain_key(self) -> dict:
        """What determines :meth:`init` and :meth:`retrain` (JSON-able): methods with equal keys share originals and
        cached oracles. By default the whole method config, so nothing is shared."""
        return {"method": self.name, "config": self.config.to_dict()}

    def state_key(self) -> dict:
        """What makes this method's states (JSON-able; bound into every ledger, :func:`data_binding`): a state is
        refused by a method whose key differs. By default :meth:`retrain_key`; a method whose retrain key names
        fields that only choose how a state is computed (solvers, tolerances) narrows it to the model's fields."""
        return self.retrain_key()

    def retrain_inputs(self, state: State) -> PyTree:
        """The parts of ``state`` besides its ledger that :meth:`retrain` depends on (hashed into oracle cache keys);
        by default the whole state, which never shares an oracle wrongly."""
        return state

    def publish(self, state: State, key: jax.Array) -> State:
        """The method's output randomisation applied to a (retrained) state: the identity for noiseless methods."""
        del key
        return state

    def init_population(self, keys: Sequence[jax.Array]) -> list[State]:
        """One original per key (independent initialisations and data orders)."""
        return [self.init(k) for k in keys]

    def retrain_population(self, state: State, keys: Sequence[jax.Array]) -> list[State]:
        """One independent retrain per key on ``state``'s retained data (each from its own original recipe)."""
        return [self.retrain(self.with_ledger(self.init(k), state.ledger), k) for k in keys]

    def fit(self, state: State, ids, *, epochs: int, learning_rate: float, batch_size: int, momentum: float,
            seed: int) -> State:
        """Fine-tunes the published model on the samples ``ids`` with its own training objective (relearn time)."""
        raise NotImplementedError(f"method {self.name!r} does not implement fit (needed for relearn time).")

    def mean_loss(self, state: State, x, y) -> float:
        """Mean training loss of the published model on ``(x, y)`` (the objective :meth:`fit` minimises)."""
        raise NotImplementedError(f"method {self.name!r} does not implement mean_loss (needed for relearn time).")

    def plan_capacity(self, num_removed: int) -> None:
        """A hint that a planned stream will remove about ``num_removed`` samples (a method may size buffers so that
        the stream compiles once). No-op by default."""
        del num_removed

    def baselines(self) -> tuple[str, ...]:
        """Names of timed retrain recipes besides :meth:`retrain` that the forget job may run (``eval.baselines``)."""
        return ()

    def run_baseline(self, name: str, state: State, *, info: ForgetInfo, reference: PyTree) -> dict | None:
        """Runs baseline ``name`` on ``state``'s retained data, judged against ``reference`` (the retrain's
        :meth:`params`, host float64): ``{"seconds", "passes", "rel_error", ...}``, or ``None`` where it does not
        apply."""
        raise KeyError(f"method {self.name!r} has no baseline {name!r}; valid: {list(self.baselines())}.")

    def warm_up(self, state: State, ids, baselines: Sequence[str] = ()) -> None:
        """Compiles everything a timed request runs (results discarded): by default one forget of ``ids``, with the
        default key as a stream's requests have it."""
        self.forget(state, ids)

    def readouts(self, state: State, last: ForgetInfo | None, reference: PyTree, *, plots_dir: str | None = None,
                 seed: int = 0) -> dict:
        """Method-specific report fields after a stream, given the last request's info and ``reference`` (the
        retrain's :meth:`params`, host float64); JSON-able; PNGs may go to ``plots_dir``."""
        return {}

    def describe(self, state: State) -> dict:
        """Method-specific facts about a built state (solver choice, sizes...), JSON-able."""
        return {}

    def profile(self, state: State, repeats: int = 5) -> dict:
        """Method-specific throughput measurements for the benchmark (medians of ``repeats`` after a warm-up)."""
        return {}

    def depends_on(self, state: State) -> np.ndarray:
        """Ids of the training data ``state`` was computed from (``verify`` checks none is forgotten)."""
        return self.train_ids[state.ledger.retain_mask()]

    @classmethod
    def study(cls, name: str, config: ml_collections.ConfigDict, *, workdir: str | None = None) -> dict:
        """A method-specific benchmark study (e.g. mixed-linear's direct-vs-CG crossover); PNGs may go to
        ``workdir``."""
        raise KeyError(f"method {cls.name!r} has no benchmark study {name!r}.")


# --------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------


def _hex(words: np.ndarray) -> str:
    return np.asarray(words, "<u4").tobytes().hex()[:12]


def validate_fields(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, where: str) -> None:
    """Checks that ``config`` has exactly the fields of ``defaults`` with values of compatible types.

    Numbers must be finite; a string field must be a string, a tuple a sequence, a section a section.

    Raises:
      ConfigError: an unknown or missing field (the valid names are listed), or a value of the wrong type.
    """
    have, want = set(config.keys()), set(defaults.keys())
    if have - want:
        raise errors.ConfigError(f"{where}: unknown config field(s) {sorted(have - want)}; valid: {sorted(want)}.")
    if want - have:
        raise errors.ConfigError(f"{where}: missing config field(s) {sorted(want - have)}.")
    for key in sorted(want):
        value, default = config[key], defaults[key]
        label = f"{where}: {key}"
        if default is None:
            continue
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise errors.ConfigError(f"{label} must be a section, got {value!r}.")
            validate_fields(value, default, label)
        elif isinstance(default, bool):
            if not isinstance(value, (bool, np.bool_)):
                raise errors.ConfigError(f"{label} must be True or False, got {value!r}.")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise errors.ConfigError(f"{label} must be a number, got {value!r}.")
            if not np.isfinite(float(value)):
                raise errors.ConfigError(f"{label} must be a finite number, got {value!r}.")
            if isinstance(default, int) and not isinstance(default, bool) and float(value) != int(value):
                raise errors.ConfigError(f"{label} must be an integer, got {value!r}.")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise errors.ConfigError(f"{label} must be a string, got {value!r}.")
        elif isinstance(default, tuple):
            if not isinstance(value, (tuple, list)):
                raise errors.ConfigError(f"{label} must be a sequence, got {value!r}.")


def check_choice(value, choices: Sequence, what: str) -> None:
    """Raises ``ConfigError`` unless ``value`` is one of ``choices`` (all listed)."""
    if value not in choices:
        raise errors.ConfigError(f"{what} must be one of {list(choices)}, got {value!r}.")


def check_range(value, what: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, why: str = "") -> None:
    """Raises ``ConfigError`` unless ``value`` is a finite number with ``low ≤ value ≤ high`` (``low < value`` with
    ``low_open``); ``why`` is appended to the message."""
    why = f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(float(value)):
        raise errors.ConfigError(f"{what} must be a finite number, got {value!r}{why}.")
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise errors.ConfigError(f"{what} must be {'>' if low_open else '>='} {low}, got {value!r}{why}.")
    if high is not None and v > high:
        raise errors.ConfigError(f"{what} must be <= {high}, got {value!r}{why}.")


def host_rng(key: jax.Array) -> np.random.Generator:
    """A host generator seeded by a PRNG key's data.

    Host-side draws (data orders, random labels) need no device operation: requests run under a host-to-device
    transfer guard (:func:`jax.transfer_guard_host_to_device`), which refuses the implicit copies of Python scalars
    that a call like ``jax.random.randint(key, (), 0, n)`` makes.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def seed_of(key: jax.Array) -> int:
    """An integer seed drawn from ``key`` on the host (e.g. for :func:`jaxforget.data.batch_indices`).

    Examples:
      >>> seed_of(jax.random.key(0)) == seed_of(jax.random.key(0)) != seed_of(jax.random.key(1))
      True
    """
    return int(host_rng(key).integers(2**30))


@functools.cache
def _jitted_apply(model: nn.Module):
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def batched_logits(model: nn.Module, variables: PyTree, x: np.ndarray, batch_size: int = 1024) -> jax.Array:
    """Eval-mode logits ``[n, K]`` of ``model`` in fixed-size batches (the last padded: one compilation)."""
    return batched_apply(_jitted_apply(model), variables, x, batch_size)


def batched_apply(apply, variables: PyTree, x: np.ndarray, batch_size: int = 1024) -> jax.Array:
    """``apply(variables, x)`` (a jitted function of a batch) over host inputs in fixed-size batches, the last
    padded (one compilation), concatenated as float32."""
    n = len(x)
    if n == 0:
        return jnp.zeros((0, *jax.eval_shape(apply, variables, x[:1]).shape[1:]), jnp.float32)
    size = min(batch_size, n)
    out = []
    for lo in range(0, n, size):
        part = x[lo : lo + size]
        pad = size - len(part)
        if pad:
            part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
        out.append(apply(variables, jax.device_put(part))[: size - pad])
    return jnp.concatenate(out).astype(jnp.float32)
