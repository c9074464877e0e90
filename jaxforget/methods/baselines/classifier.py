"""Baselines on a general network (every parameter may change), each a method on the contract.

A :class:`ClassifierMethod` trains its original with the ``train`` recipe (cross-entropy, SGD + momentum, coupled L2,
cosine learning rate; :mod:`jaxforget.train`) on the whole training set, and its gold standard is the same recipe
from scratch on the retained data with the original's key (same initialisation and data-order seed). A subclass
only says how a request changes the weights (:meth:`ClassifierMethod.unlearn`):

* ``retrain``: the gold standard itself (exact by definition; the cost every other method is judged against);
* ``finetune``: a few epochs of the recipe's SGD on ``D_r``, from the current weights;
* ``neggrad``: gradient ascent on ``D_f``; with ``retain_weight = α > 0`` NegGrad+, ``α·CE(D_r) − (1−α)·CE(D_f)``
  with a retain and a forget batch in every step (Kurmanji et al., SCRUB, NeurIPS 2023);
* ``random_label``: fine-tuning with ``D_f`` relabelled uniformly at random among the wrong classes, on ``D_r ∪ D_f``
  (``use_retain=False``: on ``D_f`` only) (Graves et al., AAAI 2021; the "RL" baseline of SalUn);
* ``fisher_forgetting`` (:mod:`.fisher_forgetting`) and ``certified_removal`` (:mod:`.certified_removal`) live in
  their own modules.

The recipe's ``solver`` is ``"sgd"`` (the minibatch recipe above, the default) or a full-batch solver of the same
objective, ``(1/n) Σ ℓ_i + (λ_wd/2)‖θ‖²`` (:func:`jaxforget.train.train_full_batch`: ``"newton"`` or ``"lbfgs"`` to
a gradient tolerance ``tol``), which a convex model needs for a Newton removal step to be the exact removal.

Every batch is drawn from the full training arrays through fixed-shape plans, so a stream of requests compiles once.
Without a key, a request's randomness (data order, random labels) comes from the original's key and the request
number: rerunning a request reproduces it.
"""

from __future__ import annotations

import abc
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxforget import errors, models, train
from jaxforget import mesh as mesh_lib
from jaxforget.methods import base

PyTree = Any


@struct.dataclass
class ClassifierState:
    """A general network's state.

    Attributes:
      variables: ``{"params": ..., ["batch_stats": ...]}`` of the published model.
      ledger: the deletion ledger.
      key: ``uint32[2]`` raw data of the PRNG key the original was trained with (the retrain reuses it).
    """

    variables: PyTree
    ledger: base.Ledger
    key: jax.Array


def recipe_config() -> ml_collections.ConfigDict:
    """The ``train`` recipe of the original and of its retrain.

    ``solver``: ``"sgd"`` (``epochs`` of SGD + momentum with the cosine schedule) or a full-batch solver of the same
    objective, ``"newton"`` / ``"lbfgs"``, run until the gradient norm of the mean-form objective is at most ``tol``
    (or ``max_iter`` iterations; the SGD fields are then unused).
    """
    return ml_collections.ConfigDict(dict(epochs=30, batch_size=64, learning_rate=0.05, momentum=0.9,
                                          weight_decay=5e-4, solver="sgd", tol=1e-6, max_iter=100))


#: The recipe's solvers: the minibatch recipe, then :data:`jaxforget.train.FULL_BATCH_SOLVERS`.
SOLVERS = ("sgd", *train.FULL_BATCH_SOLVERS)


def recipe_key(recipe: ml_collections.ConfigDict) -> dict:
    """The fields of a ``train`` recipe that determine what it trains: an SGD recipe ignores the full-batch solver's
    fields, so its key (and every oracle cached or state bound under it) is the one it had before they existed."""
    out = recipe.to_dict()
    if out.get("solver", "sgd") == "sgd":
        for field in ("solver", "tol", "max_iter"):
            out.pop(field, None)
    return out


class ClassifierMethod(base.Method, abc.ABC):
    """A method whose state is an ordinary trained classifier (see the module docstring)."""

    def __init__(self, model, splits, config, *, mesh=None):
        super().__init__(model, splits, config, mesh=mesh)
        self._programs: dict = {}  # the jitted passes and steps of this method object, by name (:meth:`_jitted`)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(name=cls.name, train=recipe_config()))

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        super().validate_config(config)
        t = config.train
        for field in ("epochs", "batch_size"):
            base.check_range(t[field], f"method.train.{field}", low=1)
        base.check_range(t.learning_rate, "method.train.learning_rate", low=0, low_open=True)
        base.check_range(t.momentum, "method.train.momentum", low=0, high=1)
        base.check_range(t.weight_decay, "method.train.weight_decay", low=0)
        base.check_choice(t.solver, SOLVERS, "method.train.solver")
        base.check_range(t.tol, "method.train.tol", low=0, low_open=True)
        base.check_range(t.max_iter, "method.train.max_iter", low=1)

    # ------------------------------------------------------------------ the recipe

    def _linear_term(self, key: jax.Array) -> PyTree | None:
        """A linear term ``b`` of the training objective drawn from the recipe's key (``(1/n) bᵀθ``, full-batch
        solvers only); ``None`` for the plain recipe."""
        del key
        return None

    def _recipe(self, key: jax.Array, rows: np.ndarray, desc: str) -> PyTree:
        """The ``train`` recipe from the initialisation and data order of ``key`` on ``rows``."""
        return self._fit_recipe(key, rows, desc)[0]

    def _fit_recipe(self, key: jax.Array, rows: np.ndarray, desc: str) -> tuple[PyTree, dict]:
        """:meth:`_recipe` and its work ``{"steps", "examples"}``: SGD steps and the examples they read, or the
        full-batch solver's iterations, each counted as one pass over ``rows`` (its curvature and line-search
        passes aside)."""
        t = self.config.train
        init_key, order_key = jax.random.split(key)
        train_set = self.splits.train
        variables = models.init_variables(self.model, init_key, train_set.x.shape[1:])
        if t.solver != "sgd":
            variables, info = train.train_full_batch(
                self.model, variables, train_set.x, train_set.y, rows=rows, weight_decay=t.weight_decay,
                solver=t.solver, tol=t.tol, max_iter=t.max_iter, linear=self._linear_term(key), mesh=self.mesh)
            errors.check_finite(variables, f"weights trained by method.train.solver {t.solver!r} ({desc})")
            if not info.converged:
                warnings.warn(f"{desc}: method.train.solver {t.solver!r} stopped after {info.iterations} iterations "
                              f"at gradient norm {info.grad_norm:.3e} > method.train.tol {t.tol:g}; raise "
                              "method.train.max_iter (a removal step that assumes a stationary model is then "
                              "biased).", RuntimeWarning, stacklevel=3)
            return variables, {"steps": info.iterations, "examples": info.iterations * len(rows)}
        variables, _ = train.train_classifier(
            self.model, variables, train_set.x, train_set.y, rows=rows, epochs=t.epochs, batch_size=t.batch_size,
            learning_rate=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay,
            seed=base.seed_of(order_key), desc=desc)
        batch = min(t.batch_size, len(rows))
        steps = t.epochs * (len(rows) // batch)
        return variables, {"steps": steps, "examples": steps * batch}

    def _recipe_population(self, keys: Sequence[jax.Array], rows: np.ndarray, desc: str) -> list[PyTree]:
        """:meth:`_recipe` for many keys in one vmapped program (equal to the loop up to float reassociation); a loop
        for the full-batch solvers (each converges in its own number of iterations)."""
        t = self.config.train
        if t.solver != "sgd":
            return [self._recipe(k, rows, desc=f"{desc} {i + 1}/{len(keys)}") for i, k in enumerate(keys)]
        split = [jax.random.split(k) for k in keys]
        shape = self.splits.train.x.shape[1:]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[models.init_variables(self.model, init_key, shape) for init_key, _ in split])
        stacked, _ = train.train_classifiers(
            self.model, stacked, self.splits.train.x, self.splits.train.y, rows=rows,
            seeds=[base.seed_of(order_key) for _, order_key in split], epochs=t.epochs, batch_size=t.batch_size,
            learning_rate=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay, desc=desc)
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(keys))]

    def init(self, key: jax.Array) -> ClassifierState:
        variables = self._recipe(key, np.arange(self.num_train), desc="original")
        return ClassifierState(variables, self.empty_ledger(), jax.random.key_data(key))

    def retrain(self, state: ClassifierState, key: jax.Array | None = None) -> ClassifierState:
        self.check_state(state)
        key = jax.random.wrap_key_data(state.key) if key is None else key
        variables = self._recipe(key, self.retained_positions(state), desc="retrain")
        return ClassifierState(variables, state.ledger, jax.random.key_data(key))

    def init_population(self, keys: Sequence[jax.Array]) -> list[ClassifierState]:
        variables = self._recipe_population(keys, np.arange(self.num_train), desc="originals")
        return [ClassifierState(v, self.empty_ledger(), jax.random.key_data(k))
                for v, k in zip(variables, keys, strict=True)]

    def retrain_population(self, state: ClassifierState, keys: Sequence[jax.Array]) -> list[ClassifierState]:
        variables = self._recipe_population(keys, self.retained_positions(state), desc="retrains")
        return [ClassifierState(v, state.ledger, jax.random.key_data(k)) for v, k in zip(variables, keys, strict=True)]

    def retrain_inputs(self, state: ClassifierState) -> PyTree:
        return state.key  # the retrain is the recipe from the original's key

    def retrain_key(self) -> dict:
        # Every classifier baseline with the same model and recipe has the same original and the same retrain.
        return {"family": "classifier", "model": repr(self.model), "train": recipe_key(self.config.train)}

    # ------------------------------------------------------------------ contract

    def predict(self, state: ClassifierState, x) -> jax.Array:
        return base.batched_logits(self.model, state.variables, self.check_inputs(x))

    def params(self, state: ClassifierState) -> PyTree:
        return state.variables["params"]

    def abstract_state(self) -> ClassifierState:
        variables = models.init_variables(self.model, jax.random.key(0), self.splits.train.x.shape[1:])
        return ClassifierState(variables, self.empty_ledger(),
                               jax.random.key_data(jax.random.key(0)))

    def forget(self, state: ClassifierState, ids, *, key: jax.Array | None = None
               ) -> tuple[ClassifierState, base.ForgetInfo]:
        positions = self.validate_request(state, ids)
        new_ledger = state.ledger.record(positions)
        request = int(new_ledger.num_requests)
        if key is None:  # reproducible: the original's key and the request number
            key = jax.random.fold_in(jax.random.wrap_key_data(state.key), jax.device_put(np.uint32(request)))
        retain = np.flatnonzero(new_ledger.retain_mask())
        forget = np.flatnonzero(~new_ledger.retain_mask())  # every request so far: D_f is their union
        start = time.perf_counter()
        variables, work = self.unlearn(state, forget_rows=forget, retain_rows=retain, key=key)
        jax.block_until_ready(variables)
        seconds = time.perf_counter() - start
        new_state = ClassifierState(variables, new_ledger, state.key)
        examples = work.pop("examples", 0)
        noiseless = work.pop("noiseless", None)
        return new_state, base.ForgetInfo(
            request=request, num_forgotten=len(positions), num_retained=len(retain), seconds=seconds,
            passes=examples / max(len(retain), 1), solver=self.name, iterations=work.pop("steps", 0),
            residual=work.pop("residual", None), notes=work,
            noiseless=None if noiseless is None else ClassifierState(noiseless, new_ledger, state.key))

    @abc.abstractmethod
    def unlearn(self, state: ClassifierState, *, forget_rows: np.ndarray, retain_rows: np.ndarray,
                key: jax.Array) -> tuple[PyTree, dict]:
        """New variables after forgetting; also ``{"steps", "examples", ...notes}`` (work done), and optionally
        ``"residual"`` and ``"noiseless"`` (the variables before the method's noise, for evaluation only).

        Args:
          state: the state before the request.
          forget_rows: positions of every sample forgotten so far (this request's included).
          retain_rows: positions of the retained samples.
          key: this request's PRNG key.
        """

    # ------------------------------------------------------------------ relearn time

    def fit(self, state: ClassifierState, ids, *, epochs: int, learning_rate: float, batch_size: int,
            momentum: float, seed: int) -> ClassifierState:
        rows = self.splits.train.index_of(np.asarray(ids))
        variables, _ = train.train_classifier(
            self.model, state.variables, self.splits.train.x, self.splits.train.y, rows=rows, epochs=epochs,
            batch_size=batch_size, learning_rate=learning_rate, momentum=momentum, seed=seed, desc="fit")
        return state.replace(variables=variables)

    def mean_loss(self, state: ClassifierState, x, y) -> float:
        logits = self.predict(state, x)
        return float(train.cross_entropy(logits, jnp.asarray(y)))

    # ------------------------------------------------------------------ shared by the subclasses

    def _sgd(self, variables: PyTree, y: np.ndarray, plans, *, epochs: int, total_steps: int,
             desc: str) -> PyTree:
        c = self.config
        variables, _ = train.fit(self.model, variables, self.splits.train.x, y, plans, epochs=epochs,
                                 total_steps=total_steps, learning_rate=c.learning_rate, momentum=c.momentum,
                                 weight_decay=c.weight_decay, desc=desc)
        return variables

    def _place_rows(self, positions: np.ndarray, chunk: int):
        """``(x, y, w)`` of the training rows ``positions``, sharded over the mesh, padded with weight-0 rows to a
        power-of-two number of ``chunk``-row batches per device (a stream of request sizes compiles a few
        programs)."""
        unit = self.mesh.size * chunk
        batches = max(1, -(-len(positions) // unit))
        pad = unit * (1 << (batches - 1).bit_length()) - len(positions)
        train_set = self.splits.train
        x = np.concatenate([np.asarray(train_set.x[positions]),
                            np.zeros((pad, *train_set.x.shape[1:]), train_set.x.dtype)])
        y = np.concatenate([np.asarray(train_set.y[positions], np.int32), np.zeros(pad, np.int32)])
        w = np.concatenate([np.ones(len(positions), np.float32), np.zeros(pad, np.float32)])
        return mesh_lib.shard_rows((x, y, w), self.mesh, chunk)

    def _jitted(self, name: str, make):
        """``jax.jit(make())``, built once per name: a stream of requests reuses its compiled programs."""
        if name not in self._programs:
            self._programs[name] = jax.jit(make())
        return self._programs[name]

    def _data_pass(self, name: str, batch_fn, chunk: int):
        """``jit(data_parallel_sum(batch_fn))`` over :meth:`_place_rows` data, built once per name."""
        return self._jitted(name, lambda: mesh_lib.data_parallel_sum(batch_fn, self.mesh, chunk))


def _unlearn_config(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """The recipe config plus an unlearning optimiser (``epochs`` of SGD at ``learning_rate``) and ``fields``."""
    config.update(dict(epochs=5, batch_size=64, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, **fields))
    return config


def _validate_unlearn(config) -> None:
    base.check_range(config.epochs, "method.epochs", low=0)
    base.check_range(config.batch_size, "method.batch_size", low=1)
    base.check_range(config.learning_rate, "method.learning_rate", low=0)
    base.check_range(config.momentum, "method.momentum", low=0, high=1)
    base.check_range(config.weight_decay, "method.weight_decay", low=0)


class Retrain(ClassifierMethod):
    """The gold standard as a method: a request retrains from scratch on ``D_r`` with the original's key."""

    name = "retrain"

    def unlearn(self, state, *, forget_rows, retain_rows, key):
        del forget_rows, key  # the recipe's own key: forget() equals retrain() exactly
        variables, work = self._fit_recipe(jax.random.wrap_key_data(state.key), retain_rows, desc="retrain")
        # Residual 0: this is the gold standard itself (the recipe from scratch on the retained data).
        return variables, {**work, "residual": 0.0}


class Finetune(ClassifierMethod):
    """``epochs`` of SGD on ``D_r`` from the current weights (catastrophic forgetting of ``D_f``)."""

    name = "finetune"

    @classmethod
    def default_config(cls):
        return _unlearn_config(super().default_config())

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        _validate_unlearn(config)

    def unlearn(self, state, *, forget_rows, retain_rows, key):
        del forget_rows
        batch = min(self.config.batch_size, len(retain_rows))
        seed, num_steps = base.seed_of(key), self.num_train // batch
        variables = self._sgd(
            state.variables, np.asarray(self.splits.train.y),
            lambda e: train.epoch_plan(retain_rows, batch, seed=seed, epoch=e, num_steps=num_steps),
            epochs=self.config.epochs, total_steps=self.config.epochs * (len(retain_rows) // batch), desc="finetune")
        steps = self.config.epochs * (len(retain_rows) // batch)
        return variables, {"steps": steps, "examples": steps * batch}


def cycled_plan(rows: np.ndarray, batch_size: int, num_steps: int, *, seed: int, epoch: int,
                weight: float) -> train.Plan:
    """``num_steps`` batches over ``rows``, reshuffled each time the rows run out (a small forget set)."""
    order, cycle = [], 0
    while len(order) < num_steps * batch_size:
        perm = np.random.default_rng([seed, epoch, cycle]).permutation(len(rows))
        order.extend(np.asarray(rows)[perm].tolist())
        cycle += 1
    indices = np.asarray(order[: num_steps * batch_size], np.int32).reshape(num_steps, batch_size)
    return train.Plan(indices, np.full(indices.shape, weight, np.float32), np.ones(num_steps, bool))


class NegGrad(ClassifierMethod):
    """Gradient ascent on ``D_f`` (``retain_weight = 0``), or NegGrad+ ``α·CE(D_r) − (1−α)·CE(D_f)``.

    Plain NegGrad makes ``epochs`` passes over ``D_f`` in batches of ``min(batch_size, |D_f|)``; NegGrad+ makes
    ``epochs`` passes over ``D_r``, each step with a retain batch and a forget batch of the same size (the forget
    samples reshuffled each time they run out). The loss weights ``α/B`` and ``−(1−α)/B`` give exactly the two mean
    cross-entropies (see :mod:`jaxforget.train`).
    """

    name = "neggrad"

    @classmethod
    def default_config(cls):
        return _unlearn_config(super().default_config(), retain_weight=0.0)

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        _validate_unlearn(config)
        base.check_range(config.retain_weight, "method.retain_weight", low=0, high=1)

    def unlearn(self, state, *, forget_rows, retain_rows, key):
        c, seed = self.config, base.seed_of(key)
        y = np.asarray(self.splits.train.y)
        alpha = float(c.retain_weight)
        if alpha == 0.0:
            batch = min(c.batch_size, len(forget_rows))
            steps = len(forget_rows) // batch
            plans = lambda e: train.epoch_plan(forget_rows, batch, seed=seed, epoch=e, weight=-1.0)
            examples = c.epochs * steps * batch
        else:
            batch = min(c.batch_size, len(retain_rows))
            steps, num_steps = len(retain_rows) // batch, self.num_train // batch
            f_batch = min(batch, len(forget_rows))

            def plans(e):
                retain = train.epoch_plan(retain_rows, batch, seed=seed, epoch=e, num_steps=num_steps,
                                          weight=alpha / batch)
                forget = cycled_plan(forget_rows, f_batch, num_steps, seed=seed, epoch=e,
                                     weight=-(1.0 - alpha) / f_batch)
                return train.join_plans(retain, forget)

            examples = c.epochs * steps * (batch + f_batch)
        variables = self._sgd(state.variables, y, plans, epochs=c.epochs, total_steps=c.epochs * steps,
                              desc="neggrad")
        return variables, {"steps": c.epochs * steps, "examples": examples, "retain_weight": alpha}


class RandomLabel(ClassifierMethod):
    """Fine-tuning with ``D_f`` relabelled uniformly among the wrong classes (with ``D_r`` unless ``use_retain`` is
    off); fresh labels per request from its key."""

    name = "random_label"

    @classmethod
    def default_config(cls):
        return _unlearn_config(super().default_config(), use_retain=True)

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        _validate_unlearn(config)

    @property
    def uses_retained_data(self) -> bool:  # type: ignore[override]
        return bool(self.config.use_retain)

    def unlearn(self, state, *, forget_rows, retain_rows, key):
        c = self.config
        label_key, order_key = jax.random.split(key)
        y = np.array(self.splits.train.y)
        # A uniform wrong class: the true label plus a shift in 1..K-1, modulo K.
        shift = base.host_rng(label_key).integers(1, self.num_classes, size=len(forget_rows))
        y[forget_rows] = (y[forget_rows] + shift) % self.num_classes
        rows = np.sort(np.concatenate([retain_rows, forget_rows])) if c.use_retain else forget_rows
        batch = min(c.batch_size, len(rows))
        seed, steps = base.seed_of(order_key), len(rows) // batch
        num_steps = self.num_train // batch
        variables = self._sgd(
            state.variables, y, lambda e: train.epoch_plan(rows, batch, seed=seed, epoch=e, num_steps=num_steps),
            epochs=c.epochs, total_steps=c.epochs * steps, desc="random_label")
        return variables, {"steps": c.epochs * steps, "examples": c.epochs * steps * batch}
