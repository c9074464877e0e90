"""The forgetting job: train, serve a stream of forget requests, compare each with retraining, report.

``run(config, workdir)`` is what ``python -m launch.forget`` calls. For each request it measures the method
and, in the same process and after warm-up, the gold standard (a float64 exact retrain on the retained data
with the same core) and the timed retrain baselines. A checkpoint (state + ledger + the report so far) is
written after every request, so a killed job resumes where it stopped; ``report.json`` and the PNG plots are
written atomically at the end.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxforget import checkpoint, compat, evaluate, kernels, ledger, mesh, models, progress, report
from jaxforget import data as data_lib
from jaxforget import mixed_linear as ml_lib

PyTree = Any


def request_plan(splits: data_lib.Splits, num_requests: int, fraction: float, seed: int) -> list[np.ndarray]:
    """Disjoint forget requests of ``fraction`` of the user ids each, drawn with a fixed seed.

    Examples:
      >>> s = data_lib.make_splits(data_lib.load_digits(), seed=0)
      >>> [len(r) for r in request_plan(s, 3, 0.01, seed=0)]
      [10, 10, 10]
    """
    user = np.asarray(splits.user_ids)
    size = max(1, int(round(fraction * len(user))))
    if size * num_requests > len(user):
        raise ValueError(f"{num_requests} requests of {size} ids exceed the {len(user)} user ids.")
    order = np.random.default_rng(seed).permutation(user)
    return [np.sort(order[k * size : (k + 1) * size]) for k in range(num_requests)]


def _abstract_state(ml: ml_lib.MixedLinear) -> ml_lib.MixedLinearState:
    """A state with the right structure, shapes and dtypes, to restore a checkpoint into."""
    core = models.init_variables(ml.model, jax.random.key(0), ml.splits.train.x.shape[1:])
    lin, _ = ml.split(core)
    return ml_lib.MixedLinearState(
        core=core, w_u=kernels.tree_zeros_like(lin), removed_by=ledger.new_ledger(ml.num_train),
        num_requests=jnp.zeros((), jnp.int32),
    )


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def _warm_up(ml: ml_lib.MixedLinear, state: ml_lib.MixedLinearState, ids: np.ndarray, cfg) -> None:
    """Runs every timed path once (results discarded) so that no timing below includes compilation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ml.forget(state, ids, key=jax.random.key(0))
        ml.solve(state, dtype=jnp.float64, maxiter=1, on_fail="warn")
        ml.solve(state, tol=0.0, atol=1.0, maxiter=1, on_fail="warn", precondition=False)
        if "cg_to_error" in cfg.eval.baselines:
            ml.solve(state, dtype=jnp.float64, tol=0.0, maxiter=1, on_fail="warn", precondition=False,
                     w_ref=state.w_u, ref_tol=1e-3)
    if "sgd_retrain" in cfg.eval.baselines:
        jax.block_until_ready(ml.sgd_train(state, epochs=1))


def _readouts(ml, state, w_oracle64, splits, removed_ids) -> dict:
    """Accuracy on forget/retain/test for the method and the oracle, activation and weight distances."""
    retain_ids = ml.train_ids[ledger.retain_mask(state.removed_by)]
    sets = {"forget": splits.train.subset(removed_ids), "retain": splits.train.subset(retain_ids), "test": splits.test}
    logits = {k: np.asarray(ml.predict(state, v.x)) for k, v in sets.items()}
    oracle = {k: np.asarray(ml.predict(state, v.x, w_u=w_oracle64)) for k, v in sets.items()}
    out = evaluate.compare(logits, oracle, {k: v.y for k, v in sets.items()})
    out["weights"] = evaluate.weight_distance(state.w_u, w_oracle64)
    return out


def build(config: ml_collections.ConfigDict) -> tuple[data_lib.Splits, ml_lib.MixedLinear]:
    """The dataset split and the method object a config describes."""
    splits = data_lib.get_splits(config.data)
    model = models.get_model(config.model)
    device_mesh = mesh.make_mesh(config.num_devices or None)
    return splits, ml_lib.MixedLinear(model, splits, config.method, mesh=device_mesh)


def restore_latest_state(ml: ml_lib.MixedLinear, workdir: str) -> ml_lib.MixedLinearState:
    """The state of the newest checkpoint in ``workdir`` (after a finished run: the last request's)."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint under {workdir}.")
    state, _ = ckpt.restore(step, _abstract_state(ml))
    ckpt.close()
    return state


@compat.host_blas_threads(1)  # see compat.host_blas_threads: XLA keeps the cores while timing
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole job and returns the report (also written to ``workdir/report.json``)."""
    os.makedirs(workdir, exist_ok=True)
    # ------------------------------------------------------------------ setup
    splits, ml = build(config)
    device_mesh = ml.mesh
    plan = request_plan(splits, config.requests.num_requests, config.requests.fraction, config.requests.seed)
    # Before any factorisation: the direct path then compiles once for the whole stream, and knows its length.
    ml.reserve_capacity(sum(len(r) for r in plan))
    plan_hash = hashlib.sha256(b"".join(r.astype(np.int64).tobytes() for r in plan)).hexdigest()[:16]
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint_max_to_keep)

    # ------------------------------------------------------------------ train or resume
    step = ckpt.latest_step()
    if step is None:
        state, train_seconds = _timed(ml.init, jax.random.key(config.seed))
        meta = {"train_seconds": train_seconds, "requests": [], "plan_sha256": plan_hash, "resumed_at": []}
        ckpt.save(0, state, meta)
        step = 0
    else:
        state, meta = ckpt.restore(step, _abstract_state(ml))
        if meta.get("plan_sha256") != plan_hash:
            raise ValueError(
                f"{workdir} holds a run with a different request plan; use a fresh --workdir for a new config."
            )
        meta["resumed_at"] = list(meta.get("resumed_at", [])) + [step]
        logging.info("Resumed from step %d (%d requests done).", step, step)
        print(f"resumed from checkpoint step {step}", flush=True)

    # ------------------------------------------------------------------ reference for the start state
    # A fresh float64 factorisation where the size allows, else float64 CG warm-started at the trained w_u
    # (already near the optimum: a solve from zero costs ~10x more at κ ≈ 1e6).
    w_oracle, _ = ml.reference_solve(state, w_start=state.w_u, tol=config.eval.oracle_tol,
                                     maxiter=config.eval.oracle_maxiter, on_fail="warn")
    if step < len(plan):
        _warm_up(ml, state, plan[step], config)
        if ml.choose_solver(state.core).path.startswith("direct"):
            # Compile the refinement kernels too (whether a request needs refinement depends on its rounding).
            warm_removed = ledger.record(state.removed_by, np.searchsorted(ml.train_ids, plan[step]), step + 1)
            ml._direct_solve(state, warm_removed, state.w_u, min_refine=1)
        ml.clear_removal_cache()  # the first timed request must not reuse the warm-up's removal rows
    core_test_acc = evaluate.accuracy(ml.predict_core(state, splits.test.x), splits.test.y)
    initial = {
        "test_accuracy": evaluate.accuracy(ml.predict(state, splits.test.x), splits.test.y),
        "core_test_accuracy": core_test_acc,
        "rel_distance_to_optimum": evaluate.weight_distance(state.w_u, w_oracle)["relative"],
    }
    meta.setdefault("initial", initial)
    pre_seconds = 0.0
    if config.method.preconditioner != "none":
        # Built once, outside every request's timing; rebuilt here so that its time excludes compilation.
        ml.clear_preconditioner()
        ml.preconditioner(state)
        pre_seconds = ml.preconditioner_seconds
    w_before_pre_noise = state.w_u
    # Nothing may recompile between requests: count the forget kernels' traces (the direct path pads the removed
    # set to powers of two, so it may compile O(log requests) times; the count is reported either way).
    choice = ml.choose_solver(state.core)
    meta["solver_choice"] = choice.to_json()
    if choice.path.startswith("direct"):
        factor = ml.direct_factor(state)  # on a resume this is where it is built (and its kernels compiled)
        meta["direct_factor_seconds"] = factor.build_seconds
        meta["direct_inverse_seconds"] = factor.inverse_seconds
        meta["direct_check"] = factor.check
    traces_before = _forget_traces(ml)

    # ------------------------------------------------------------------ the request stream
    eta = progress.Eta(len(plan), "requests", done=step)
    last_info = None
    for k in range(step, len(plan)):
        ids = plan[k]
        new_state, info = ml.forget(state, ids)
        w_new_oracle, oracle_info = ml.reference_solve(
            new_state, w_start=w_oracle, tol=config.eval.oracle_tol, maxiter=config.eval.oracle_maxiter,
            on_fail="warn",
        )
        dist = evaluate.weight_distance(info.w_pre_noise, w_new_oracle)
        before = evaluate.weight_distance(w_before_pre_noise, w_new_oracle)
        record = {
            "request": k + 1,
            "forget": {**info.to_json(), "converged": info.solver != "cg" or info.rel_residual <= config.method.tol},
            "oracle": oracle_info,
            "solver_residual_rel": dist["relative"],
            "influence_left": dist["l2"] / before["l2"] if before["l2"] > 0 else 0.0,
            "readouts": _readouts(ml, new_state, w_new_oracle, splits, ledger.forgotten_ids(new_state.removed_by,
                                                                                             ml.train_ids)),
            "kl_proxy_nats": ml_lib.kl_proxy(info.w_pre_noise, w_new_oracle, info.sigma) if info.sigma > 0 else None,
            "retrain": {},
            "speedup_vs_retrain": {},
        }
        if "cg_retrain" in config.eval.baselines and info.solver != "forget_all":
            atol = config.method.tol * info.grad_norm  # the same absolute residual the forget reached
            with warnings.catch_warnings():  # non-convergence is recorded, not fatal, for a baseline
                warnings.simplefilter("ignore", RuntimeWarning)
                (w_cg, cg_info), secs = _timed(ml.solve, new_state, tol=0.0, atol=atol,
                                               maxiter=config.method.maxiter, on_fail="warn", precondition=False)
            record["retrain"]["cg_retrain"] = {
                "seconds": secs, "passes": int(cg_info.iterations) + 2, "converged": bool(cg_info.converged),
                "iterations": int(cg_info.iterations), "rel_residual": float(cg_info.rel_residual),
                "rel_error": evaluate.weight_distance(w_cg, w_new_oracle)["relative"],
            }
        if "cg_to_error" in config.eval.baselines and info.solver != "forget_all":
            # Plain CG from zero until it is as close to the exact retrain as the forget (at least 1e-3, the
            # benchmark target's error): float64, since a float32 CG from zero stalls above 1e-3 at κ ≳ 1e6.
            target = max(dist["relative"], 1e-3)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                (w_cg, cg_info), secs = _timed(ml.solve, new_state, dtype=jnp.float64, tol=0.0,
                                               maxiter=config.method.maxiter, on_fail="warn", precondition=False,
                                               w_ref=w_new_oracle, ref_tol=target)
            reached = evaluate.weight_distance(w_cg, w_new_oracle)["relative"]
            record["retrain"]["cg_to_error"] = {
                "seconds": secs, "passes": int(cg_info.iterations) + 2, "iterations": int(cg_info.iterations),
                "target_rel_error": target, "rel_error": reached, "converged": bool(reached <= target),
            }
        if "sgd_retrain" in config.eval.baselines:
            w_sgd, secs = _timed(ml.sgd_train, new_state, seed=k)
            record["retrain"]["sgd_retrain"] = {
                "seconds": secs, "passes": int(config.method.user.epochs),
                "rel_error": evaluate.weight_distance(w_sgd, w_new_oracle)["relative"],
            }
        for name, r in record["retrain"].items():
            record["speedup_vs_retrain"][name] = r["seconds"] / max(info.seconds, 1e-12)
        meta["requests"].append(record)
        state, w_oracle, w_before_pre_noise, last_info = new_state, w_new_oracle, info.w_pre_noise, info
        ckpt.save(k + 1, state, meta)
        eta.step(f"CG iterations {info.iterations}, residual to retrain {dist['relative']:.2e}")
    meta["recompilations_between_requests"] = int(_forget_traces(ml) - traces_before)
    meta["solver_memory_bytes"] = ml.solver_memory_bytes()
    meta["preconditioner_build_seconds"] = pre_seconds
    meta["peak_host_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # ------------------------------------------------------------------ noise sweep and forget-all
    if last_info is not None:
        meta["sigma_sweep"] = _sigma_sweep(ml, state, last_info.w_pre_noise, w_oracle, splits, config)
    all_state = ml.forget_all(state)
    core_logits = np.asarray(ml.predict_core(state, splits.test.x))
    meta["forget_all"] = {
        "max_abs_logit_diff_to_core": float(np.max(np.abs(np.asarray(ml.predict(all_state, splits.test.x))
                                                          - core_logits))),
        "test_accuracy": evaluate.accuracy(core_logits, splits.test.y),
    }

    # ------------------------------------------------------------------ report
    out = report.build(config, meta, splits=splits.to_json(), env=_environment(device_mesh))
    report.write_json(out, os.path.join(workdir, "report.json"))
    report.plot_requests(out, os.path.join(workdir, "requests.png"))
    if "sigma_sweep" in meta:
        report.plot_sigma_sweep(out, os.path.join(workdir, "sigma_sweep.png"))
    ckpt.close()
    return out


def _forget_traces(ml: ml_lib.MixedLinear) -> int:
    """Compiled variants of every kernel a forget request runs."""
    kernels_ = (ml._newton_step, ml._hessian_solve, ml._dual_remove, ml._primal_remove, ml._cholesky_solve,
                ml._dual_request, ml._dual_check, ml._gather_rows, ml._write_rows, ml._gram_gradients,
                ml._remove_rows_gradients)
    return sum(k._cache_size() for k in kernels_)


def _sigma_sweep(ml, state, w_pre_noise, w_oracle, splits, config) -> list[dict]:
    """Test error, distance to the oracle and the KL proxy of the last request's output for each σ."""
    rows = []
    key = jax.random.key(config.seed + 1)
    noise = kernels.tree_random_normal(key, w_pre_noise)
    oracle_norm = float(kernels.tree_norm(kernels.tree_cast(w_oracle, jnp.float32)))
    for sigma in config.eval.sigma_sweep:
        w = kernels.tree_axpy(sigma, noise, w_pre_noise)
        logits = ml.predict(state, splits.test.x, w_u=w)
        rows.append({
            "sigma": float(sigma),
            "test_error": 1.0 - evaluate.accuracy(logits, splits.test.y),
            "rel_distance_to_oracle": evaluate.weight_distance(w, w_oracle)["l2"] / oracle_norm,
            "kl_proxy_nats": ml_lib.kl_proxy(w_pre_noise, w_oracle, float(sigma)),
        })
    return rows


def _environment(device_mesh) -> dict:
    import flax
    import optax
    import orbax.checkpoint
    import sklearn

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": int(device_mesh.size),
        "process_count": jax.process_count(),
    }
