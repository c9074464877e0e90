r"""Mixed-linear forgetting (ML-Forgetting, Golatkar et al., CVPR 2021).

A *core* network ``w_c`` is trained on core data only. Everything learned from the task data lives
in user weights ``w_u`` of the network linearized around ``w_c``:

.. math::  f(x; w_u) = f_c(x) + J_c(x)\, w_u .

With the regularised square loss (mean over the training set ``S``, one-hot targets scaled by ``α``)

.. math::  L_S(w_u) = \frac{1}{2|S|}\sum_{i\in S}\lVert f_c(x_i) + J_i w_u - \alpha y_i\rVert^2
           + \frac{\mu}{2}\lVert w_u\rVert^2

the problem is quadratic: ``H_S = (1/|S|) Σ J_iᵀJ_i + μI`` does not depend on ``w_u``, and forgetting a
request ``D_f`` is one exact Newton step on the retained data ``D_r``,

.. math::  w_u \leftarrow w_u - H_{D_r}^{-1} g_{D_r}(w_u) + \sigma\varepsilon = w^*_{D_r} + \sigma\varepsilon,

from *any* ``w_u``. The step is solved by the direct path (a factorisation of the full-data system, then an exact
low-rank removal per request: :mod:`.direct`), matrix-free by Newton-CG (every product one JVP + VJP pass over
``D_r``, optionally with float64 refinement), or by the paper's SGD on the auxiliary quadratic (:mod:`.sgd`).
Forgetting all user data is ``w_u = 0``. The retain set is a mask over the fixed training set, so shapes never
change and nothing recompiles between requests.

Conventions: ``σ`` is a standard deviation; ``g`` and ``H`` use means over ``D_r`` with the same ``μ``
(the gold-standard retrain is the minimiser of ``L_{D_r}`` with the same core).

Everything a later request needs is in :class:`MixedLinearState` (core, ``w_u``, ledger, and the request check
that ``direct_check="auto"`` chose by timing). The object only keeps caches keyed by content (:mod:`.cache`):
time-only ones, and the direct path's stream state, which a miss rebuilds by replaying the ledger, so a fresh
object (e.g. after a restore) forgets the next request bit for bit like the live one.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from jaxforget import compat, errors, kernels, models, solvers
from jaxforget import data as data_lib
from jaxforget.methods import base
from jaxforget.methods.base import ForgetInfo, Ledger
from jaxforget.methods.mixed_linear import cache as cache_lib
from jaxforget.methods.mixed_linear import config as config_lib
from jaxforget.methods.mixed_linear import core as core_lib
from jaxforget.methods.mixed_linear import direct, harness, paths
from jaxforget.methods.mixed_linear import sgd as sgd_lib
from jaxforget.methods.mixed_linear.problem import LinearizedProblem

PyTree = Any

#: Codes of :attr:`MixedLinearState.direct_check`.
DIRECT_CHECKS = ("undecided", "gram", "data")
default_method_config = config_lib.default_method_config


@struct.dataclass
class MixedLinearState:
    """Everything a mixed-linear model is, as one pytree (checkpointed as a whole).

    Attributes:
      core: core variables ``{"params": ..., ["batch_stats": ...]}`` (``w_c``; never changes).
      w_u: user weights, shaped like the linearized subtree of ``core["params"]``.
      ledger: the deletion ledger (:class:`~jaxforget.methods.base.Ledger`).
      direct_check: ``int32[]``, how the primal direct path checks a request once ``direct_check="auto"`` has
        decided it by timing (an index into :data:`DIRECT_CHECKS`; 0: not decided yet). Recorded so that every later
        request, in this process or a resumed one, takes the same computation path.
    """

    core: PyTree
    w_u: PyTree
    ledger: Ledger
    direct_check: jax.Array


class MixedLinear(base.Method):
    """The mixed-linear method on one dataset split.

    The object holds the (static) model, the training data laid out on the device mesh (:attr:`problem`) and the
    jitted kernels, compiled once; the :class:`MixedLinearState` pytree holds everything that changes.

    Args:
      model: a flax module (``models.get_model``), called with ``train=False`` for linearization.
      splits: the dataset split (``train`` = core + user, ``test``).
      config: method section (:func:`default_method_config`).
      mesh: data-parallel mesh; all devices by default.

    Examples:
      >>> import jaxforget as jf
      >>> splits = jf.data.make_splits(jf.data.load_digits(), seed=0)
      >>> model = jf.models.MLP(hidden=(16,))
      >>> cfg = default_method_config(); cfg.core.epochs = 2; cfg.linearize = "head"
      >>> ml = MixedLinear(model, splits, cfg)
      >>> state = ml.init(jax.random.key(0))
      >>> state, info = ml.forget(state, splits.user_ids[:5], key=jax.random.key(1))
      >>> info.num_forgotten, bool(info.residual <= cfg.tol)
      (5, True)
    """

    name = "mixed_linear"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return default_method_config()

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        config_lib.validate(config)

    def __init__(self, model: nn.Module, splits: data_lib.Splits, config: ml_collections.ConfigDict, *,
                 mesh: jax.sharding.Mesh | None = None):
        super().__init__(model, splits, config, mesh=mesh)
        self.core_ids = np.asarray(splits.core_ids)
        # A linearize spec that names no layer of this model is refused now (shapes only: nothing runs).
        models.linearize_predicate(jax.eval_shape(lambda: models.init_variables(
            model, jax.random.key(0), splits.train.x.shape[1:]))["params"], config.linearize)
        self.problem = LinearizedProblem(model, splits.train, config, self.mesh)
        self._cache = cache_lib.SolverCache(self.problem, config)
        self._sgd = sgd_lib.SGDRecipe(self.problem)

    def split(self, core: PyTree) -> tuple[PyTree, PyTree]:
        """``(lin, fix)``: the linearized parameter subtree and the rest, replicated on the mesh."""
        return self.problem.split(core)

    # ------------------------------------------------------------------ choosing and building solvers

    def choose_solver(self, core: PyTree) -> direct.SolverChoice:
        """The solver path for this core (``config.solver`` resolved; ``"auto"`` decides by size)."""
        return self._cache.choice(core)

    def direct_factor(self, state: MixedLinearState) -> direct.DirectFactor:
        """The float64 factorisation of the full-data system (:func:`.direct.build_factor`), once per core, checking
        requests as the state recorded (:attr:`MixedLinearState.direct_check`) or as the config says."""
        return self._cache.factor(state.core, check=self.recorded_check(state))

    def recorded_check(self, state: MixedLinearState) -> str | None:
        """The request check ``state`` recorded (``None``: not decided yet, or the config names one)."""
        code = int(np.asarray(state.direct_check))
        if not 0 <= code < len(DIRECT_CHECKS):
            raise errors.StateMismatchError(f"The state's direct_check code {code} is not one of "
                                            f"{dict(enumerate(DIRECT_CHECKS))}: the state was not made by this method.")
        return None if code == 0 or self.config.direct_check != "auto" else DIRECT_CHECKS[code]

    def _record_check(self, state: MixedLinearState) -> MixedLinearState:
        """``state`` recording how the primal direct path checked its last request (unchanged off that path)."""
        factor = self._cache.held_factor(state.core)
        if factor is None or factor.check not in DIRECT_CHECKS:
            return state
        # explicit: requests run under a host-to-device transfer guard
        return state.replace(direct_check=jax.device_put(np.int32(DIRECT_CHECKS.index(factor.check))))

    def reserve_capacity(self, num_removed: int) -> None:
        """Plans a stream removing ``num_removed`` samples: the dual removal buffer is sized for it (one compilation
        for the stream), and ``direct_inverse="auto"`` decides by it."""
        self._cache.capacity = int(num_removed)

    @property
    def direct_capacity(self) -> int:
        """Samples the planned stream removes (:meth:`reserve_capacity`)."""
        return self._cache.capacity

    def clear_removal_cache(self) -> None:
        """Drops the direct path's stream state: the next request replays its ledger (the same result, at the cost
        of the stream so far), so that a benchmark's first timed request after a warm-up pays its full cost."""
        self._cache.clear_stream()

    def _direct_solve(self, state: MixedLinearState, removed_by, w_old: PyTree, *, min_refine: int = 0
                      ) -> tuple[PyTree, float, float, float]:
        """``(w (float64), ‖g_r(w)‖/‖g_r(w_old)‖, ‖g_r(w_old)‖, passes)`` on the retained rows of ``removed_by``
        from the cached factor and stream (:func:`.direct.direct_solve`)."""
        factor = self.direct_factor(state)
        stream = self._cache.stream(state.core, removed_by)
        out = direct.direct_solve(self.problem, self._cache.kernels, factor, stream, state.core, w_old,
                                  tol=self.config.tol, min_refine=min_refine,
                                  max_refine=max(int(self.config.direct_refine), min_refine))
        return out.w, out.rel_residual, out.grad_norm, out.passes

    def preconditioner(self, state: MixedLinearState, dtype=jnp.float32) -> solvers.Nystrom | None:
        """The CG preconditioner (``None`` without one): a Nyström sketch of ``(1/|D_c|) Σ_{D_c} J_iᵀJ_i`` over core
        samples only, which are never forgotten, so it holds nothing of any request and serves them all."""
        return self._cache.preconditioner(state.core, dtype, np.isin(self.train_ids, self.core_ids))

    @property
    def preconditioner_seconds(self) -> float:
        """Build time of the last preconditioner (reported apart from requests)."""
        return self._cache.preconditioners.seconds

    def clear_preconditioner(self) -> None:
        """Drops cached preconditioners (the next solve rebuilds them)."""
        self._cache.preconditioners.clear()

    def solver_memory_bytes(self) -> dict[str, int]:
        """Bytes held by the solver state of the current core (:meth:`.cache.SolverCache.memory_bytes`)."""
        return self._cache.memory_bytes()

    # ------------------------------------------------------------------ training and the exact retrain

    def train_core(self, key: jax.Array) -> PyTree:
        """Trains ``w_c`` on core data only (:func:`.core.train_core`)."""
        return core_lib.train_core(self.model, self.splits, self.config.core, key)

    def train_cores(self, keys: list[jax.Array], *, chunk: int = 64) -> list[PyTree]:
        """One core per key, trained in parallel (:func:`.core.train_cores`)."""
        return core_lib.train_cores(self.model, self.splits, self.config.core, keys, chunk=chunk)

    def init_state(self, core: PyTree) -> MixedLinearState:
        """A state on ``core`` with zero user weights and nothing forgotten (no training)."""
        errors.check_finite(core, "core weights")
        lin, _ = self.split(core)
        return MixedLinearState(core=core, w_u=self.problem.zeros_like(lin), ledger=self.empty_ledger(),
                                direct_check=jnp.zeros((), jnp.int32))

    def init(self, key: jax.Array, core: PyTree | None = None) -> MixedLinearState:
        """Trains the core (unless given) and the user weights on the whole training set."""
        key_core, key_user = jax.random.split(key)
        state = self.init_state(self.train_core(key_core) if core is None else core)
        uc = self.config.user
        solver = uc.solver
        if solver == "auto":
            solver = "direct" if self.choose_solver(state.core).path.startswith("direct") else "reference"
        if solver == "direct":
            w = self._direct_solve(state, state.ledger.removed_by, state.w_u)[0]
        elif solver == "reference":  # a factorisation when the size allows (else float64 CG)
            w, _ = self.reference_solve(state, tol=uc.tol, maxiter=uc.maxiter, on_fail="warn")
        elif solver == "cg":
            w, _ = self.solve(state, dtype=jnp.float64, tol=uc.tol, maxiter=uc.maxiter, on_fail="warn")
        else:
            w = self.sgd_train(state, epochs=uc.epochs, seed=int(jax.random.randint(key_user, (), 0, 2**30)))
        return self._record_check(state.replace(w_u=optax.tree.cast(w, jnp.float32)))

    solve = paths.newton_solve  # the Newton-CG solve from any start, float32 or float64
    reference_solve = paths.reference_solve  # the retrain oracle's solve

    def exact_retrain(self, state: MixedLinearState, *, tol: float = 1e-11, maxiter: int | None = None) -> PyTree:
        """``w*`` (float64) by :meth:`reference_solve` with ``on_fail="raise"``."""
        return self.reference_solve(state, tol=tol, maxiter=maxiter, on_fail="raise")[0]

    def sgd_train(self, state: MixedLinearState, *, epochs: int | None = None, seed: int = 0) -> PyTree:
        """The paper's recipe for ``w_u`` on the retained data from 0 (also the "50-epoch SGD retrain" baseline)."""
        uc = self.config.user
        lin, fix = self.split(state.core)
        return self._sgd.run(lin, fix, self.problem.weights(state.ledger.removed_by, jnp.float32),
                             self.problem.zeros_like(lin), epochs=uc.epochs if epochs is None else epochs,
                             batch_size=uc.batch_size, learning_rate=uc.learning_rate, momentum=uc.momentum, seed=seed)

    def gradient(self, state: MixedLinearState, w_u: PyTree | None = None) -> tuple[PyTree, float]:
        """``(g_{D_r}(w_u), L_{D_r}(w_u))`` with one exact pass over the retained data (float32)."""
        lin, fix, x, t, c, count = self.problem.float32(state.core, state.ledger.removed_by)
        g, loss = self.problem.gradient(lin, fix, self.problem.replicate(state.w_u if w_u is None else w_u), x, t, c,
                                        count)
        return g, float(loss)

    def largest_eigenvalue(self, state: MixedLinearState) -> float:
        """β = λ_max(H_{D_r}) by power iteration (``optax.power_iteration``; the smoothness constant, κ = β/μ)."""
        lin, fix, x, _, c, count = self.problem.float32(state.core, state.ledger.removed_by)
        return float(self.problem.largest_eigenvalue(lin, fix, x, c, count))

    def _with_removed(self, state: MixedLinearState, removed_by) -> MixedLinearState:
        """``state`` whose ledger marks ``removed_by`` (an evaluation view; the request count is kept)."""
        removed_by = jax.device_put(np.asarray(removed_by, np.int32))
        return state.replace(ledger=state.ledger.replace(removed_by=removed_by))

    # ------------------------------------------------------------------ forgetting

    @compat.host_blas_threads(1)  # the request's small host/LAPACK work must not take XLA's cores
    def forget(self, state: MixedLinearState, ids, *, key: jax.Array | None = None, sigma: float | None = None
               ) -> tuple[MixedLinearState, ForgetInfo]:
        """Forgets the samples ``ids``: one exact Newton step on the retained data, plus noise.

        Every host-to-device copy it makes is explicit (it runs under ``jax.transfer_guard_host_to_device``).

        Args:
          state: current state (not modified).
          ids: user sample ids to forget (1-D integers).
          key: PRNG key for the noise; by default a fresh key from the OS entropy pool, never stored.
          sigma: noise std (defaults to ``config.sigma``).

        Returns:
          ``(new_state, info)``. ``info.noiseless`` is the noise-free state (for evaluation only; publishing it
          would undo the noise); ``info.residual`` the relative gradient residual ``‖g_r(w)‖/‖g_r(w_old)‖``;
          ``info.notes`` holds ``grad_norm`` (``‖g_r(w_old)‖``) and ``step_norm``.

        Raises:
          EmptyRequestError, DuplicateIdsError, UnknownIdsError, CoreIdsError, AlreadyForgottenError,
          ShapeDtypeError: invalid ids. NonFiniteError: NaN/Inf in weights or gradient.
          CGNotConvergedError, DirectSolveError: the solve missed its tolerance (``config.on_fail="warn"`` to
          accept). On any error the given state is untouched and no new state is returned.
        """
        cfg, pb = self.config, self.problem
        sigma = cfg.sigma if sigma is None else float(sigma)
        if not (np.isfinite(sigma) and sigma >= 0):
            raise errors.ConfigError(f"sigma must be a finite number >= 0, got {sigma}.")
        positions = self.validate_request(state, ids)
        errors.check_finite(state.w_u, "user weights w_u")
        new_ledger = state.ledger.record(positions)
        request, removed_by = int(new_ledger.num_requests), np.asarray(new_ledger.removed_by)
        retained = new_ledger.retain_mask()
        start = time.perf_counter()
        if np.setdiff1d(self.train_ids[retained], self.core_ids).size == 0:  # nothing of the user's is left
            new_state = state.replace(w_u=pb.zeros_like(pb.replicate(state.w_u)), ledger=new_ledger)
            return new_state, ForgetInfo(request=request, num_forgotten=len(positions),
                                         num_retained=int(retained.sum()), seconds=time.perf_counter() - start,
                                         passes=0.0, solver="forget_all", residual=0.0)
        path = self.choose_solver(state.core).path
        if path.startswith("direct"):
            step = paths.direct_request(self, state, removed_by, request, path)
        elif path == "cg" and cfg.cg_precision == "refined":
            step = paths.refined_request(self, state, removed_by, request)
        elif path == "cg":
            step = paths.cg_request(self, state, removed_by, request)
        else:
            step = paths.sgd_request(self, state, removed_by, request)
        errors.check_finite(step.w, f"weights after forget request {request}")
        w_new = step.w
        if sigma > 0:
            key = _fresh_key(pb.sharding) if key is None else pb.replicate(key)  # one placement: one compilation
            w_new = pb.add_noise(w_new, key, pb.scalar(sigma, jnp.float32))
        jax.block_until_ready(w_new)
        info = ForgetInfo(
            request=request, num_forgotten=len(positions), num_retained=int(retained.sum()),
            seconds=time.perf_counter() - start, passes=float(step.passes), solver=path,
            iterations=int(step.iterations), residual=float(step.rel), sigma=sigma,
            notes={"grad_norm": float(step.grad_norm), "step_norm": float(step.step_norm)},
            noiseless=state.replace(w_u=step.w, ledger=new_ledger) if sigma > 0 else None,
        )
        return self._record_check(state.replace(w_u=w_new, ledger=new_ledger)), info

    def forget_all(self, state: MixedLinearState) -> MixedLinearState:
        """Forgets every user sample exactly: ``w_u = 0``, so the model is the core model.

        The ledger marks every remaining user sample as removed by a new request.
        """
        remaining = state.ledger.retain_mask() & ~np.isin(self.train_ids, self.core_ids)
        w_u = self.problem.zeros_like(self.problem.replicate(state.w_u))
        return state.replace(w_u=w_u, ledger=state.ledger.record(np.flatnonzero(remaining)))

    # ------------------------------------------------------------------ prediction

    def predict(self, state: MixedLinearState, x, *, w_u: PyTree | None = None, batch_size: int = 1024) -> jax.Array:
        """Logits ``[n, K]`` of the mixed-linear model ``f_c(x) + J_c(x) w_u`` on images ``x: [n, H, W, C]``."""
        x = self.check_inputs(x)
        if len(x) == 0:
            return jnp.zeros((0, self.num_classes), jnp.float32)
        pb = self.problem
        w_u = state.w_u if w_u is None else w_u
        dtype = jax.tree.leaves(w_u)[0].dtype
        with compat.enable_x64() if dtype == jnp.float64 else contextlib.nullcontext():
            lin, fix, w_u = pb.replicate(optax.tree.cast((*self.split(state.core), w_u), dtype))
            out = [pb.predict(lin, fix, w_u, jax.device_put(np.asarray(x[i : i + batch_size], dtype)))
                   for i in range(0, len(x), batch_size)]
            return jnp.concatenate(out).astype(jnp.float32)

    def predict_core(self, state: MixedLinearState, x) -> jax.Array:
        """Logits of the core network alone (``w_u = 0``)."""
        return self.predict(state, x, w_u=optax.tree.zeros_like(state.w_u))

    # ------------------------------------------------------------------ the rest of the method contract

    def protected_ids(self) -> np.ndarray:
        return self.core_ids

    def retrain(self, state: MixedLinearState, key: jax.Array | None = None) -> MixedLinearState:
        """The gold standard: the float64 minimiser on the retained rows with the same core, by a fresh
        factorisation (:meth:`reference_solve`); the core is never retrained, it never saw user data. ``w_u`` of
        the result is float64. ``key`` is unused: the retrain is deterministic."""
        del key
        self.check_state(state)
        w, info = self.reference_solve(state, tol=self.config.retrain_tol, maxiter=self.config.retrain_maxiter,
                                       on_fail="warn")
        if not info["converged"]:
            raise errors.CGNotConvergedError(
                f"The retrain oracle did not converge: relative residual {info['rel_residual']:.3e} by route "
                f"{info['route']!r} (method.retrain_tol {self.config.retrain_tol:g}); raise retrain_maxiter.")
        return state.replace(w_u=w)

    def params(self, state: MixedLinearState) -> PyTree:
        return state.w_u

    def abstract_state(self) -> MixedLinearState:
        core = models.init_variables(self.model, jax.random.key(0), self.splits.train.x.shape[1:])
        predicate = models.linearize_predicate(core["params"], self.config.linearize)
        lin, _ = kernels.split_params(core["params"], predicate)
        return MixedLinearState(core=core, w_u=optax.tree.zeros_like(lin), ledger=self.empty_ledger(),
                                direct_check=jnp.zeros((), jnp.int32))

    def retrain_key(self) -> dict:
        config = {k: v for k, v in self.config.to_dict().items() if k not in config_lib.SOLVER_ONLY_FIELDS}
        return {"family": "mixed_linear", "model": repr(self.model), "config": config}

    def state_key(self) -> dict:
        # The fields that define the model a state holds (the core, the linearization and the user problem); the
        # solver, tolerance, layout and noise fields only choose how a request computes it.
        fields = ("linearize", "mu", "regularization", "target_scale", "core", "user")
        config = self.config.to_dict()
        return {"family": "mixed_linear", "model": repr(self.model), "config": {k: config[k] for k in fields}}

    def retrain_inputs(self, state: MixedLinearState) -> PyTree:
        return state.core  # the exact retrain keeps the core

    def publish(self, state: MixedLinearState, key: jax.Array) -> MixedLinearState:
        """The mechanism's output: ``w_u + σ ε`` (the identity at ``σ = 0``)."""
        sigma = float(self.config.sigma)
        if sigma == 0:
            return state
        w = self.problem.replicate(optax.tree.cast(state.w_u, jnp.float32))
        noise_key = self.problem.replicate(key)
        return state.replace(w_u=self.problem.add_noise(w, noise_key, self.problem.scalar(sigma, jnp.float32)))

    def init_population(self, keys) -> list[MixedLinearState]:
        """Originals with independently trained cores (one vmapped program per chunk of cores)."""
        cores = self.train_cores([jax.random.split(k)[0] for k in keys])
        return [self.init(k, core=core) for k, core in zip(keys, cores, strict=True)]

    def retrain_population(self, state: MixedLinearState, keys) -> list[MixedLinearState]:
        """Retrains on ``state``'s retained rows, each on its own independently trained core."""
        cores = self.train_cores([jax.random.split(k)[0] for k in keys])
        return [self.retrain(self.init_state(core).replace(ledger=state.ledger)) for core in cores]

    def fit(self, state: MixedLinearState, ids, *, epochs: int, learning_rate: float, batch_size: int,
            momentum: float, seed: int) -> MixedLinearState:
        """SGD on the model's own square loss, over the samples ``ids`` only, from the published ``w_u``."""
        removed_by = np.where(np.isin(self.train_ids, np.asarray(ids)), 0, 1).astype(np.int32)
        lin, fix = self.split(state.core)
        w = self._sgd.run(lin, fix, self.problem.weights(removed_by, jnp.float32),
                          optax.tree.cast(state.w_u, jnp.float32), epochs=epochs, batch_size=batch_size,
                          learning_rate=learning_rate, momentum=momentum, seed=seed)
        return state.replace(w_u=w)

    def mean_loss(self, state: MixedLinearState, x, y) -> float:
        """``½ mean ‖f(x) − α·onehot(y)‖²``, the model's training loss without the ridge."""
        logits = np.asarray(self.predict(state, x), np.float64)
        target = self.config.target_scale * np.eye(logits.shape[1])[np.asarray(y)]
        return float(0.5 * np.mean(np.sum((logits - target) ** 2, axis=1)))

    def plan_capacity(self, num_removed: int) -> None:
        self.reserve_capacity(num_removed)

    def baselines(self) -> tuple[str, ...]:
        return harness.BASELINES

    # The harness hooks' answers (timed baselines, warm-up, report fields, profile) live in .harness.
    run_baseline = harness.run_baseline
    warm_up = harness.warm_up
    describe = harness.describe
    readouts = harness.readouts
    profile = harness.profile

    @classmethod
    def study(cls, name: str, config: ml_collections.ConfigDict, *, workdir: str | None = None) -> dict:
        if name == "crossover":
            return harness.crossover(config.job, list(config.widths), requests=int(config.requests))
        return super().study(name, config, workdir=workdir)


def _fresh_key(sharding: jax.sharding.Sharding) -> jax.Array:
    """A PRNG key from the OS entropy pool (its raw bits copied to the device explicitly, placed like the weights)."""
    bits = np.frombuffer(secrets.token_bytes(8), np.uint32)
    return jax.random.wrap_key_data(jax.device_put(bits, sharding))


def certificate_kl(residual_norm: float, mu: float, sigma: float) -> float:
    r"""A-posteriori bound :math:`\rho^2 / (2\mu^2\sigma^2)` nats on the KL to the noisy exact retrain (spec §6.2)."""
    if sigma == 0:
        return 0.0 if residual_norm == 0 else float("inf")
    return residual_norm**2 / (2 * mu**2 * sigma**2)


__all__ = ["MixedLinear", "MixedLinearState", "certificate_kl", "default_method_config"]
