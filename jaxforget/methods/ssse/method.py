r"""SSSE, single-step sample erasure (Peste, Alistarh & Lampert, 2021), on the method contract.

A general network (every parameter) trained with the classifier recipe (:mod:`jaxforget.methods.baselines`) on the
whole training set; its curvature (:mod:`.curvature`) is built once after training and kept in the state. A request
``S`` is one closed-form second-order step from the samples to erase alone (spec ``ssse.md`` §3):

.. math::  \hat\theta = \theta + \frac{\varepsilon}{n_r} \, C_r^{-1} \sum_{i \in S} \big(\nabla \ell_i(\theta)
           + \lambda_{wd}\,\theta\big), \qquad C_r = \tfrac{1}{n_r} \Big(A - \sum_{i\in S} M_i(\theta)\Big)
           + (\lambda + \lambda_{wd}) I,

``n_r`` the samples retained after the request. With the exact curvature at a stationary ``θ`` and ``ε = 1`` this
is the Newton step on the retained objective (the certified-removal step of Guo et al. on convex models). The
erased samples' terms are subtracted from the held curvature (exact at the parameters it was built on, a guarded
approximation after that), so the state never keeps their curvature. Requests are sequential: each recomputes the
erased gradients at the current parameters and rebinds the curvature to the new parameters.

SSSE adds no noise by default and carries no guarantee: it is never reported as certified.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from jaxforget import errors, fingerprint, kernels, models
from jaxforget import mesh as mesh_lib
from jaxforget.methods import base
from jaxforget.methods.baselines import ClassifierMethod, recipe_config, recipe_key
from jaxforget.methods.ssse import curvature as curv_lib

PyTree = Any


@struct.dataclass
class SsseState:
    """An SSSE model.

    Attributes:
      variables: ``{"params": ..., ["batch_stats": ...]}`` of the published model.
      ledger: the deletion ledger.
      key: ``uint32[2]`` raw data of the key the original was trained with (the retrain reuses it).
      curvature: the :class:`.curvature.Curvature` bound to ``variables["params"]``.
    """

    variables: PyTree
    ledger: base.Ledger
    key: jax.Array
    curvature: curv_lib.Curvature


def default_config(name: str = "ssse") -> ml_collections.ConfigDict:
    """The SSSE method config (recommended defaults, spec §7)."""
    return ml_collections.ConfigDict(dict(
        name=name,
        train=recipe_config(),
        # gauss_newton (default: PSD, and the exact Hessian for the cross-entropy of linear models), empirical_fisher
        # (the paper's), hessian (dense or cg only).
        curvature="gauss_newton",
        # dense / sherman_morrison (asked, P ≤ max_dense_params) | block | woodbury | cg (reads D_r at erase time)
        structure="block",
        epsilon=1.0,  # step scale, 0 ≤ ε ≤ 10 (1: the Newton step)
        # After the first request the erased samples' terms are taken at the current parameters: "clip" projects the
        # downdated dense/block curvature onto the PSD cone and reports the share clipped; "raise": the guard only.
        downdate="clip",
        damping=1e-3,  # λ = damping · tr(C)/P, fixed when the curvature is built (mean units)
        block_size=256,
        rank=1024,  # woodbury: the samples whose rows are stored
        max_dense_params=4096,
        chunk=32,  # per-device samples per step of a curvature pass
        cg_tol=1e-6,
        cg_maxiter=500,
    ))


class Ssse(ClassifierMethod):
    """SSSE (see the module docstring)."""

    name = "ssse"
    EPSILON_RANGE = (0.0, 10.0)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return default_config(cls.name)

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        super().validate_config(config)
        base.check_choice(config.curvature, curv_lib.KINDS, "method.curvature")
        base.check_choice(config.structure, curv_lib.STRUCTURES, "method.structure")
        if config.curvature == "hessian" and config.structure not in ("dense", "cg"):
            raise errors.ConfigError("method.curvature 'hessian' is held only by method.structure 'dense' or 'cg' "
                                     f"(it is not a sum of outer products), got {config.structure!r}.")
        low, high = cls.EPSILON_RANGE
        base.check_range(config.epsilon, "method.epsilon", low=low, high=high)
        base.check_choice(config.downdate, ("clip", "raise"), "method.downdate")
        base.check_range(config.damping, "method.damping", low=0)
        for field in ("block_size", "rank", "max_dense_params", "chunk", "cg_maxiter"):
            base.check_range(config[field], f"method.{field}", low=1)
        base.check_range(config.cg_tol, "method.cg_tol", low=0, low_open=True)

    def __init__(self, model, splits, config, *, mesh=None):
        super().__init__(model, splits, config, mesh=mesh)
        like = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), splits.train.x.shape[1:]))
        self.layout = curv_lib.layout(like["params"], config.structure, block_size=int(config.block_size))
        if config.structure in ("dense", "sherman_morrison") and self.layout.num_params > config.max_dense_params:
            raise errors.ConfigError(
                f"method.structure {config.structure!r} holds a {self.layout.num_params} x {self.layout.num_params} "
                f"matrix, over method.max_dense_params = {config.max_dense_params}; use 'block', 'woodbury' or 'cg'.")
        self.codes = np.array([curv_lib.KINDS.index(config.curvature), curv_lib.STRUCTURES.index(config.structure)],
                              np.int32)
        self._solo = next(d for d in self.mesh.devices.flat if d.process_index == jax.process_index())
        self._indefinite = jax.jit(curv_lib.indefinite_blocks)
        self._clip = jax.jit(curv_lib.clip_blocks)

    # ------------------------------------------------------------------ data-parallel passes

    def _pass(self, name: str, batch_fn):
        """``jit(data_parallel_sum(batch_fn))`` in chunks of ``chunk`` rows per device, built once per name."""
        return self._data_pass(name, batch_fn, int(self.config.chunk))

    def _rows_data(self, positions: np.ndarray):
        """``(x, y, w)`` of the training rows ``positions`` (:meth:`ClassifierMethod._place_rows`)."""
        return self._place_rows(positions, int(self.config.chunk))

    def _term_sum(self, params: PyTree, rest: PyTree, positions: np.ndarray, data=None) -> jax.Array:
        """``Σ_i M_i`` over the rows ``positions`` (``data``: their :meth:`_rows_data`, if already placed)."""
        kind, lay, model = self.config.curvature, self.layout, self.model
        fn = self._pass("terms", lambda a, b: curv_lib.term_sum(kind, lay, model, a[0], a[1], *b))
        return fn((params, rest), self._rows_data(positions) if data is None else data)

    def _trace_sum(self, params: PyTree, rest: PyTree, positions: np.ndarray) -> jax.Array:
        kind, model = self.config.curvature, self.model
        fn = self._pass("trace", lambda a, b: curv_lib.trace_sum(kind, model, a[0], a[1], *b))
        return fn((params, rest), self._rows_data(positions))

    def _rows(self, params: PyTree, rest: PyTree, data) -> jax.Array:
        """The rows ``R_i`` of placed samples ``(x, y, w)`` stacked ``[Σ r, P]`` (padding rows zero)."""
        kind, model = self.config.curvature, self.model

        def make():
            def fn(p, r, x, y, w):
                out = curv_lib.rows(kind, model, p, r, x, y)
                out = out * w.astype(out.dtype)[:, None, None]
                return out.reshape(-1, out.shape[-1])
            return fn

        return self._jitted("rows", make)(params, rest, *data)

    def _sherman_morrison(self, params: PyTree, rest: PyTree, positions: np.ndarray, shift_sum) -> jax.Array:
        """``(λ_s I + Σ_{positions} M_i)⁻¹`` by the chunked Sherman–Morrison recursion, streaming the samples in
        chunks of ``chunk`` (one device: the recursion is sequential)."""
        chunk = int(self.config.chunk)
        flat = ravel_pytree(params)[0]
        inverse = jnp.eye(self.layout.num_params, dtype=flat.dtype) / jnp.asarray(shift_sum, flat.dtype)
        update = self._jitted("sm_update", lambda: curv_lib.sherman_morrison_update)
        train = self.splits.train
        for lo in range(0, len(positions), chunk):
            part = positions[lo:lo + chunk]
            pad = chunk - len(part)
            x = np.concatenate([np.asarray(train.x[part]), np.zeros((pad, *train.x.shape[1:]), train.x.dtype)])
            y = np.concatenate([np.asarray(train.y[part], np.int32), np.zeros(pad, np.int32)])
            w = np.concatenate([np.ones(len(part), np.float32), np.zeros(pad, np.float32)])
            inverse = update(inverse, self._rows(params, rest, jax.device_put((x, y, w))))
        return inverse

    def _grad_sum(self, params: PyTree, rest: PyTree, data) -> PyTree:
        """``Σ_S ∇ℓ_i(θ)``: one backward pass over the erased samples' :meth:`_rows_data` (eval mode)."""
        model = self.model
        batch_fn = lambda a, b: jax.grad(lambda p: curv_lib.weighted_loss_sum(model, a[1], p, *b))(a[0])
        return self._pass("grad", batch_fn)((params, rest), data)

    def _matvec_sum(self):
        """``(params, rest, v, data) -> Σ_{D} w_i M_i v`` (ravelled) by a matrix-free data-parallel pass."""
        kind, model = self.config.curvature, self.model

        def batch_fn(a, b):
            p, r, vec = a
            x, y, w = b
            tangent = ravel_pytree(p)[1](vec)
            if kind == "gauss_newton":
                f = lambda q: model.apply({"params": q, **r}, x, train=False)
                out = kernels.gn_matvec_sum(f, p, tangent, w, kernels.softmax_out_hvp)
            elif kind == "empirical_fisher":
                out = kernels.fisher_matvec_sum(curv_lib.example_loss(model, r), p, tangent, w, x, y)
            else:
                out = kernels.hvp(lambda q: curv_lib.weighted_loss_sum(model, r, q, x, y, w), p, tangent)
            return ravel_pytree(out)[0]

        return mesh_lib.data_parallel_sum(batch_fn, self.mesh, int(self.config.chunk))

    def _step_fn(self):
        """The jitted step ``(params, curvature, Σ_S g_i, k, n_r, λ_wd, ε, data) -> (θ̂, ok, ‖Δθ‖, iterations)``
        (``data``: the retained rows, read by ``cg`` only)."""
        if "step" not in self._programs:
            lay, cfg = self.layout, self.config
            matvec_sum = self._matvec_sum() if lay.structure == "cg" else None

            def step(params, rest, curvature, grads, k, n_r, wd, eps, data):
                flat, unravel = ravel_pytree(params)
                iterations = jnp.int32(0)

                def solve(u):
                    nonlocal iterations
                    if matvec_sum is None:
                        return curv_lib.solve(curvature, lay, u, wd)
                    lam = curv_lib.shift(curvature, wd)
                    x, info = kernels.cg_solve(lambda v: matvec_sum((params, rest, v), data) / n_r + lam * v, u,
                                               tol=float(cfg.cg_tol), maxiter=int(cfg.cg_maxiter))
                    iterations = info.iterations
                    return x, info.converged & jnp.all(jnp.isfinite(x))

                new, ok, delta = erase_step(flat, grads, k, n_r, wd, eps, solve)
                return unravel(new), ok, jnp.linalg.norm(delta), iterations

            self._programs["step"] = jax.jit(step)
        return self._programs["step"]

    # ------------------------------------------------------------------ the curvature

    def _clip_where_needed(self, curvature: curv_lib.Curvature) -> tuple[curv_lib.Curvature, float]:
        """The downdated dense/block ``A`` with its indefinite blocks projected onto the PSD cone, and the share of
        the spectrum clipped. Only the blocks a Cholesky test flags are eigendecomposed (their number padded to a
        power of two so that a stream compiles a handful of programs); none at the build parameters."""
        bad = np.flatnonzero(np.asarray(self._indefinite(curvature.matrix)))
        if bad.size == 0:
            return curvature, 0.0
        size = 1 << (int(bad.size) - 1).bit_length()
        index = np.concatenate([bad, np.full(size - bad.size, bad[0])]).astype(np.int32)
        valid = np.arange(size) < bad.size
        matrix, share = self._clip(curvature.matrix, jax.device_put(index), jax.device_put(valid))
        return curvature.replace(matrix=matrix), float(share)

    def build_curvature(self, variables: PyTree, retained: np.ndarray, *, seed: int = 0) -> curv_lib.Curvature:
        """The curvature of ``variables`` over the training rows ``retained`` (positions), with its damping
        ``λ = damping · tr(C)/P``; ``woodbury`` stores the rows of ``rank`` of them drawn with ``seed``."""
        params, rest = mesh_lib.replicate(models.split_variables(variables), self.mesh)
        lay, cfg = self.layout, self.config
        stored = retained
        if lay.structure == "woodbury":
            take = min(int(cfg.rank), len(retained))
            stored = np.sort(np.random.default_rng(seed).choice(retained, take, replace=False))
        if lay.structure in ("dense", "block"):
            matrix = self._term_sum(params, rest, stored)
            owner = jnp.full(1, -1, jnp.int32)
        elif lay.structure == "woodbury":
            x = jax.device_put(np.asarray(self.splits.train.x[stored]))
            y = jax.device_put(np.asarray(self.splits.train.y[stored], np.int32))
            matrix = jax.jit(curv_lib.rows, static_argnums=(0, 1))(cfg.curvature, self.model, params, rest, x, y)
            owner = jax.device_put(stored.astype(np.int32))
        else:  # cg holds nothing; sherman_morrison needs the damping first (below)
            matrix, owner = jnp.zeros(1, jnp.float32), jnp.full(1, -1, jnp.int32)
        # tr(Σ M_i) from what is held where it holds it (no second pass over the data): the diagonal of the sum
        # (blocks: padding entries are zero), or ‖R‖² of the stored rows; the Hessian, cg and the Sherman–Morrison
        # inverse (its shift must be known before it is built) read the rows' norms.
        if cfg.curvature == "hessian" or lay.structure in ("cg", "sherman_morrison"):
            total = self._trace_sum(params, rest, stored)
        elif lay.structure == "woodbury":
            total = jnp.sum(matrix * matrix)
        else:
            total = jnp.sum(jnp.trace(matrix, axis1=-2, axis2=-1))
        damping = np.float32(cfg.damping * float(total) / max(len(stored), 1) / lay.num_params)
        if lay.structure == "sherman_morrison":  # absolute shift N_0 (λ + λ_wd), fixed from here on
            shift_sum = len(stored) * (float(damping) + float(cfg.train.weight_decay))
            if shift_sum <= 0:
                raise errors.ConfigError("method.structure 'sherman_morrison' starts from (N λ' I)⁻¹: it needs "
                                         "method.damping > 0 or method.train.weight_decay > 0.")
            matrix = self._sherman_morrison(params, rest, stored, shift_sum)
        return curv_lib.Curvature(matrix=matrix, owner=owner, count=jnp.int32(len(stored)),
                                  damping=jnp.float32(damping), layout=jnp.asarray(self.codes),
                                  params=_params_key(params))

    def check_curvature(self, state: SsseState) -> None:
        """Raises :class:`~jaxforget.errors.StateMismatchError` for a curvature of another kind or structure, or
        one that stands for other parameters than the state's."""
        codes = np.asarray(state.curvature.layout)
        if not np.array_equal(codes, self.codes):
            def name(c):
                return f"{curv_lib.KINDS[c[0]]}/{curv_lib.STRUCTURES[c[1]]}" if c.shape == (2,) else str(c)
            raise errors.StateMismatchError(f"The state's curvature is {name(codes)}, but method 'ssse' is configured "
                                            f"for {name(self.codes)}.")
        if not np.array_equal(np.asarray(state.curvature.params), np.asarray(_params_key(state.variables["params"]))):
            raise errors.StateMismatchError(
                "The state's curvature was computed for other parameters than the state's model (a curvature from "
                "another model, or parameters edited after it was built); rebuild it with build_curvature.")

    # ------------------------------------------------------------------ contract

    def init(self, key: jax.Array) -> SsseState:
        state = super().init(key)
        return SsseState(state.variables, state.ledger, state.key,
                         self.build_curvature(state.variables, np.arange(self.num_train)))

    def retrain(self, state: SsseState, key: jax.Array | None = None) -> SsseState:
        """The recipe from scratch on the retained data, with a fresh curvature for its parameters (what a later
        request on the retrained model needs)."""
        out = super().retrain(state, key)
        return SsseState(out.variables, out.ledger, out.key,
                         self.build_curvature(out.variables, self.retained_positions(state)))

    def init_population(self, keys: Sequence[jax.Array]) -> list[SsseState]:
        return [SsseState(s.variables, s.ledger, s.key, self.build_curvature(s.variables, np.arange(self.num_train)))
                for s in super().init_population(keys)]

    def retrain_population(self, state: SsseState, keys: Sequence[jax.Array]) -> list[SsseState]:
        rows = self.retained_positions(state)
        return [SsseState(s.variables, s.ledger, s.key, self.build_curvature(s.variables, rows))
                for s in super().retrain_population(state, keys)]

    def retrain_key(self) -> dict:
        return {"family": "ssse", "model": repr(self.model), "train": recipe_key(self.config.train),
                "curvature": {k: self.config[k] for k in ("curvature", "structure", "damping", "block_size", "rank")}}

    def abstract_state(self) -> SsseState:
        base_state = super().abstract_state()
        lay, p = self.layout, self.layout.num_params
        if lay.structure in ("dense", "sherman_morrison"):
            shape = (p, p)
        elif lay.structure == "block":
            shape = (lay.blocks.shape[0], lay.blocks.shape[1], lay.blocks.shape[1])
        elif lay.structure == "woodbury":
            r = self.num_classes if self.config.curvature == "gauss_newton" else 1
            shape = (min(int(self.config.rank), self.num_train), r, p)
        else:
            shape = (1,)
        owner = shape[0] if lay.structure == "woodbury" else 1
        curvature = curv_lib.Curvature(matrix=jnp.zeros(shape, jnp.float32), owner=jnp.zeros(owner, jnp.int32),
                                       count=jnp.int32(0), damping=jnp.float32(0), layout=jnp.asarray(self.codes),
                                       params=jnp.zeros(4, jnp.uint32))  # traceable: abstract_state may be traced
        return SsseState(base_state.variables, base_state.ledger, base_state.key, curvature)

    def warm_up(self, state: SsseState, ids, baselines=()) -> None:
        """One request (results discarded), and the clip of every power-of-two number of blocks a later request
        may need (:meth:`_clip_where_needed`), so that timed requests compile nothing."""
        super().warm_up(state, ids, baselines)
        if self.layout.structure in ("dense", "block") and self.config.downdate == "clip" \
                and self.config.curvature != "hessian":
            matrix = jax.device_put(state.curvature.matrix, self._solo)
            blocks = 1 if matrix.ndim == 2 else matrix.shape[0]
            size = 1
            while True:
                index = jax.device_put(np.zeros(size, np.int32))
                jax.block_until_ready(self._clip(matrix, index, jax.device_put(np.zeros(size, bool))))
                if size >= blocks:
                    break
                size *= 2

    def describe(self, state: SsseState) -> dict:
        from jaxforget.methods.ssse import harness  # pylint: disable=import-outside-toplevel

        return harness.describe(self, state)

    def readouts(self, state: SsseState, last, reference, *, plots_dir=None, seed: int = 0) -> dict:
        from jaxforget.methods.ssse import harness  # pylint: disable=import-outside-toplevel

        return harness.readouts(self, state)

    def profile(self, state: SsseState, repeats: int = 5) -> dict:
        from jaxforget.methods.ssse import harness  # pylint: disable=import-outside-toplevel

        return harness.profile(self, state, repeats)

    @classmethod
    def study(cls, name: str, config: ml_collections.ConfigDict, *, workdir: str | None = None) -> dict:
        """``structures``: every curvature structure's build, memory and accuracy (:func:`.harness.structures`);
        ``calibration``: the unrecovered fraction per curvature, ε = 1 and tuned on held-out requests
        (:func:`.calibration.calibration`)."""
        if name == "structures":
            from jaxforget.methods.ssse import harness  # pylint: disable=import-outside-toplevel

            return harness.structures(config.job, samples=int(config.samples), repeats=int(config.repeats),
                                      rank=int(config.rank), block_size=int(config.block_size),
                                      chunk=int(config.chunk))
        if name == "calibration":
            from jaxforget.methods.ssse import calibration  # pylint: disable=import-outside-toplevel

            out = calibration.calibration(config, workdir=workdir)
            return {**out, "markdown": out.get("markdown") or calibration.markdown(out)}
        return super().study(name, config, workdir=workdir)

    def unlearn(self, state, *, forget_rows, retain_rows, key):  # the classifier hook; SSSE overrides forget
        raise NotImplementedError("SSSE serves requests through forget().")

    def forget(self, state: SsseState, ids, *, key: jax.Array | None = None) -> tuple[SsseState, base.ForgetInfo]:
        """Erases ``ids`` by one second-order step (module docstring); ``key`` is unused (no noise).

        Raises:
          the request errors of :meth:`validate_request`; ForgetRequestError: the request would erase every
          remaining sample; StateMismatchError: a curvature of another configuration or for other parameters;
          NonFiniteError: NaN/Inf gradients or weights; CurvatureError: the downdate guard.
        """
        del key
        positions = self.validate_request(state, ids)
        self.check_curvature(state)
        new_ledger = state.ledger.record(positions)
        retained = np.flatnonzero(new_ledger.retain_mask())
        if retained.size == 0:
            raise errors.ForgetRequestError(
                f"The request would erase all {len(positions)} remaining samples: there is no retained objective to "
                "step towards (retrain from scratch instead).")
        cfg, lay = self.config, self.layout
        start = time.perf_counter()
        # Replicated on the mesh whatever the state's placement (fresh, restored, or a previous step's output), so
        # that every request runs the programs the first one compiled.
        params, rest = mesh_lib.replicate(models.split_variables(state.variables), self.mesh)
        erased = self._rows_data(positions)  # placed once: the gradient and the downdate read the same rows
        grads = ravel_pytree(self._grad_sum(params, rest, erased))[0]
        errors.check_finite(grads, f"gradients of the {len(positions)} erased samples")
        removed = None
        if lay.structure in ("dense", "block"):
            removed = self._term_sum(params, rest, positions, erased)
        elif lay.structure == "sherman_morrison":
            removed = self._rows(params, rest, erased)
        curvature = state.curvature
        if lay.structure != "cg":
            # The factorisations and eigendecompositions run on one local device: replicated over several CPU
            # devices, jaxlib's batched LAPACK kernels each wait on the shared thread pool for their batch, and
            # with as many concurrent waits as pool threads they deadlock (besides repeating the same work).
            params, rest, grads, removed, curvature = jax.device_put((params, rest, grads, removed, curvature),
                                                                     self._solo)
        curvature = curv_lib.downdate(curvature, lay, removed, positions)
        clipped = 0.0
        if lay.structure in ("dense", "block") and cfg.downdate == "clip" and cfg.curvature != "hessian":
            curvature, clipped = self._clip_where_needed(curvature)
        data = self._rows_data(retained) if lay.structure == "cg" else None
        dtype = ravel_pytree(params)[0].dtype
        scalar = lambda v: jax.device_put(np.asarray(v, dtype))  # explicit: requests run under a transfer guard
        new_params, ok, step_norm, iterations = self._step_fn()(
            params, rest, curvature, grads, scalar(len(positions)), scalar(len(retained)),
            scalar(cfg.train.weight_decay), scalar(cfg.epsilon), data)
        request = int(new_ledger.num_requests)
        if not bool(ok):
            if lay.structure == "cg":
                raise errors.CGNotConvergedError(
                    f"SSSE request {request}: CG on C_r did not reach method.cg_tol = {cfg.cg_tol:g} in "
                    f"{int(iterations)} iterations (method.cg_maxiter = {cfg.cg_maxiter}).")
            raise errors.CurvatureError(f"SSSE request {request}: {curv_lib.GUARD_MESSAGE}")
        errors.check_finite(new_params, f"weights after SSSE request {request}")
        seconds = time.perf_counter() - start
        variables = {**state.variables, "params": new_params}
        curvature = curvature.replace(params=_params_key(new_params))
        new_state = SsseState(variables, new_ledger, state.key, curvature)
        return new_state, base.ForgetInfo(
            request=request, num_forgotten=len(positions), num_retained=len(retained), seconds=seconds,
            passes=float(iterations), solver=f"ssse-{cfg.curvature}-{lay.structure}", iterations=int(iterations),
            residual=None, notes={"step_norm": float(step_norm), "epsilon": float(cfg.epsilon),
                                  "damping": float(curvature.damping), "curvature_bytes": curv_lib.nbytes(curvature),
                                  "downdate_clipped": clipped})


def erase_step(flat: jax.Array, grad_sum: jax.Array, num_erased, num_retained, weight_decay, epsilon,
               solve: Callable[[jax.Array], tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""SSSE's update on ravelled parameters (spec §3, mean units):

    .. math::  \hat\theta = \theta + \frac{\varepsilon}{n_r} C_r^{-1} u, \qquad
               u = \sum_{i\in S} \nabla\ell_i(\theta) + k\,\lambda_{wd}\,\theta,

    ``u`` being ``−n_r ∇L_{D_r}(θ)`` when ``θ`` is stationary for the whole training objective.

    Args:
      flat: ``θ`` ``[P]``.
      grad_sum: ``Σ_S ∇ℓ_i(θ)`` ``[P]`` (unregularised per-sample losses).
      num_erased: ``k``. num_retained: ``n_r``. weight_decay: ``λ_wd`` (the training objective's). epsilon: ``ε``.
      solve: ``u ↦ (C_r⁻¹u, ok)`` with ``C_r`` the mean-unit curvature of the retained objective.

    Returns:
      ``(θ̂, ok, θ̂ − θ)``.

    Examples:
      >>> theta = jnp.array([1.0, 2.0])
      >>> new, ok, delta = erase_step(theta, jnp.array([0.5, 0.0]), 1.0, 4.0, 0.0, 1.0, lambda u: (u / 2, True))
      >>> new.tolist()
      [1.0625, 2.0]
    """
    u = grad_sum + num_erased * weight_decay * flat
    x, ok = solve(u)
    delta = epsilon / num_retained * x
    return flat + delta, ok, delta



def _params_key(params: PyTree) -> jax.Array:
    """``uint32[4]``: the content key of ``params`` (:func:`jaxforget.fingerprint.fingerprint`)."""
    digest = bytes.fromhex(fingerprint.fingerprint(params))
    return jax.device_put(np.frombuffer(digest, "<u4").astype(np.uint32))


__all__ = ["Ssse", "SsseState", "default_config", "erase_step"]
