"""Mixed-linear's answers to the harness hooks: timed retrain baselines, warm-up, readouts, profile and studies.

The harness (forget job, comparison, benchmark) calls these through the method contract only
(:class:`~jaxforget.methods.base.Method`); everything mixed-linear-specific that a report shows lives here.

* Baselines beside the exact retrain (evaluation spec §9): ``cg_retrain`` (float32 CG from zero to the same absolute
  residual as the forget), ``cg_to_error`` (plain float64 CG from zero until it is as close to the exact retrain as
  the forget, at least 1e-3) and ``sgd_retrain`` (the paper's 50-epoch SGD recipe).
* Readouts: the noise sweep (test error, distance and KL proxy of the last request's output against σ), forget-all
  against the core model, the solver's choice, build times and memory.
* Profile: kernel throughput against a plain forward/backward pass and the conditioning κ = β/μ.
* Study ``crossover``: direct vs matrix-free CG as the linearized size grows.
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxforget import data as data_lib
from jaxforget import evaluate, models, report, train
from jaxforget import mesh as mesh_lib
from jaxforget.methods.base import ForgetInfo
from jaxforget.timing import median_time, timed

if TYPE_CHECKING:
    from jaxforget.methods.mixed_linear.method import MixedLinear, MixedLinearState

BASELINES = ("cg_retrain", "cg_to_error", "sgd_retrain")


def run_baseline(ml: MixedLinear, name: str, state: MixedLinearState, *, info: ForgetInfo, reference) -> dict | None:
    """One timed baseline on ``state``'s retained rows, judged against ``reference`` (the retrain's ``w_u``, float64);
    ``None`` when it does not apply (after forget-all)."""
    w_ref = reference
    if name in ("cg_retrain", "cg_to_error") and info.solver == "forget_all":
        return None
    with warnings.catch_warnings():  # a baseline's non-convergence is recorded, not fatal
        warnings.simplefilter("ignore", RuntimeWarning)
        if name == "cg_retrain":
            atol = ml.config.tol * info.notes["grad_norm"]  # the same absolute residual the forget reached
            (w, cg), secs = timed(ml.solve, state, tol=0.0, atol=atol, maxiter=ml.config.maxiter, on_fail="warn",
                                  precondition=False)
            return {"seconds": secs, "passes": int(cg.iterations) + 2, "converged": bool(cg.converged),
                    "iterations": int(cg.iterations), "rel_residual": float(cg.rel_residual),
                    "rel_error": evaluate.weight_distance(w, w_ref)["relative"]}
        if name == "cg_to_error":
            # Plain CG from zero until it is as close to the exact retrain as the forget (at least 1e-3):
            # float64, since a float32 CG from zero stalls above that on ill-conditioned systems.
            noiseless = info.noiseless if info.noiseless is not None else state
            target = max(evaluate.weight_distance(noiseless.w_u, w_ref)["relative"], 1e-3)
            (w, cg), secs = timed(ml.solve, state, dtype=jnp.float64, tol=0.0, maxiter=ml.config.maxiter,
                                  on_fail="warn", precondition=False, w_ref=w_ref, ref_tol=target)
            reached = evaluate.weight_distance(w, w_ref)["relative"]
            return {"seconds": secs, "passes": int(cg.iterations) + 2, "iterations": int(cg.iterations),
                    "target_rel_error": target, "rel_error": reached, "converged": bool(reached <= target)}
    if name == "sgd_retrain":
        w, secs = timed(ml.sgd_train, state, seed=info.request)
        return {"seconds": secs, "passes": int(ml.config.user.epochs),
                "rel_error": evaluate.weight_distance(w, w_ref)["relative"]}
    raise KeyError(f"method 'mixed_linear' has no baseline {name!r}; valid: {list(BASELINES)}.")


def warm_up(ml: MixedLinear, state: MixedLinearState, ids, baselines: Sequence[str] = ()) -> None:
    """Runs every timed path once on ``ids`` (results discarded), so that no timing includes compilation; the
    direct path's refinement kernels too (whether a request refines depends on its rounding). The removal cache is
    cleared afterwards: the first timed request must not reuse the warm-up's rows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        new_state, _ = ml.forget(state, ids, key=jax.random.key(0))
        ml.solve(state, tol=0.0, atol=1.0, maxiter=1, on_fail="warn", precondition=False)
        if "cg_to_error" in baselines:
            ml.solve(state, dtype=jnp.float64, tol=0.0, maxiter=1, on_fail="warn", precondition=False,
                     w_ref=state.w_u, ref_tol=1e-3)
    if "sgd_retrain" in baselines:
        jax.block_until_ready(ml.sgd_train(state, epochs=1))
    if ml.choose_solver(state.core).path.startswith("direct"):
        ml._direct_solve(state, new_state.ledger.removed_by, state.w_u, min_refine=1)
    ml.clear_removal_cache()
    if ml.config.preconditioner != "none":  # built once, outside every request's timing, excluding compilation
        ml.clear_preconditioner()
        ml.preconditioner(state)


def describe(ml: MixedLinear, state: MixedLinearState) -> dict:
    """The solver serving this core, its build times and the linearized size."""
    choice = ml.choose_solver(state.core)
    num_params = optax.tree.size(state.w_u)
    out = {"solver_choice": choice.to_json(), "num_linearized_params": num_params}
    build = 0.0
    if choice.path.startswith("direct"):
        factor = ml.direct_factor(state)
        out |= {"direct_factor_seconds": factor.build_seconds, "direct_inverse_seconds": factor.inverse_seconds,
                "direct_check": factor.check}
        build += factor.build_seconds + factor.inverse_seconds
    if ml.config.preconditioner != "none":
        out["preconditioner_build_seconds"] = ml.preconditioner_seconds
        build += ml.preconditioner_seconds
    out["build_seconds"] = build  # one-off, outside every request (factor, explicit inverse, sketch)
    out["summary"] = {"P": num_params, "precond.": ml.config.preconditioner}
    return out


def readouts(ml: MixedLinear, state: MixedLinearState, last: ForgetInfo | None, reference, *,
             plots_dir: str | None = None, seed: int = 0) -> dict:
    """After a stream: the noise sweep of the last request's output (against ``reference``, the retrain's ``w_u``),
    forget-all against the core model, and the solver's state (choice, build times, memory)."""
    memory = ml.solver_memory_bytes()
    out = describe(ml, state) | {"solver_memory_bytes": memory}
    out["summary"]["solver MiB"] = round(sum(memory.values()) / 2**20, 1)
    test = ml.splits.test
    if last is not None and last.solver != "forget_all":
        w_pre_noise = (last.noiseless if last.noiseless is not None else state).w_u
        out["sigma_sweep"] = sigma_sweep(ml, state, w_pre_noise, reference, seed=seed)
        if plots_dir is not None:
            plot_sigma_sweep(out["sigma_sweep"], os.path.join(plots_dir, "sigma_sweep.png"))
    core_logits = np.asarray(ml.predict_core(state, test.x))
    all_logits = np.asarray(ml.predict(ml.forget_all(state), test.x))
    out["forget_all"] = {"max_abs_logit_diff_to_core": float(np.max(np.abs(all_logits - core_logits))),
                         "test_accuracy": evaluate.accuracy(core_logits, test.y)}
    return out


def sigma_sweep(ml: MixedLinear, state: MixedLinearState, w_pre_noise, w_oracle, *, seed: int = 0) -> list[dict]:
    """Test error, distance to the oracle and the KL proxy of ``w_pre_noise + σε`` for each σ of the config."""
    rows = []
    w32 = ml.problem.replicate(optax.tree.cast(w_pre_noise, jnp.float32))
    noise = optax.tree.random_like(jax.random.key(seed + 1), w32)
    oracle_norm = float(np.linalg.norm(evaluate._ravel64(w_oracle)[0]))
    for sigma in ml.config.sigma_sweep:
        w = optax.tree.add_scale(w32, sigma, noise)
        logits = ml.predict(state, ml.splits.test.x, w_u=w)
        rows.append({
            "sigma": float(sigma),
            "test_error": 1.0 - evaluate.accuracy(logits, ml.splits.test.y),
            "rel_distance_to_oracle": evaluate.weight_distance(w, w_oracle)["l2"] / oracle_norm,
            "kl_proxy_nats": evaluate.kl_proxy(w_pre_noise, w_oracle, float(sigma)),
        })
    return rows


def plot_sigma_sweep(rows: list[dict], path: str) -> None:
    """Test error and distance to the oracle (left), KL proxy (right) against the noise std σ."""
    s = [r["sigma"] for r in rows]
    fig = report.figure(figsize=(12, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.semilogx(s, [r["test_error"] for r in rows], "o-", color="C3", label="test error")
    ax1.set(xlabel="noise std σ", ylabel="test error", title="Test error and residual vs σ")
    ax1b = ax1.twinx()
    ax1b.loglog(s, [r["rel_distance_to_oracle"] for r in rows], "s--", color="C0", label="‖w − w*‖/‖w*‖")
    ax1b.set_ylabel("relative distance to retrain")
    ax1.legend(loc="upper left", fontsize=7)
    ax1b.legend(loc="lower right", fontsize=7)
    kl = [r["kl_proxy_nats"] for r in rows]
    ax2.loglog(s, [max(v, 1e-300) for v in kl], "o-")
    ax2.set(xlabel="noise std σ", ylabel="KL proxy (nats)", title="Remaining-information proxy vs σ")
    report.save_figure(fig, path)


def profile(ml: MixedLinear, state: MixedLinearState, repeats: int = 5) -> dict:
    """GN matvec / (forward + backward), linearized forward / plain forward over the training set, and κ = β/μ."""
    pb = ml.problem
    lin, fix, x, t, c, count = pb.float32(state.core, state.ledger.removed_by)
    w_u = pb.replicate(state.w_u)
    v = optax.tree.random_like(jax.random.key(0), w_u)
    model, core = ml.model, pb.replicate(state.core)
    labels = jnp.argmax(t, axis=1)
    grad_fn = jax.jit(jax.grad(lambda p, x, y: train.cross_entropy(model.apply({**core, "params": p}, x), y)))
    forward = jax.jit(lambda x: model.apply(core, x))
    t_gn = median_time(lambda: pb.hessian_matvec(lin, fix, v, x, c, count), repeats)
    t_grad = median_time(lambda: grad_fn(core["params"], x, labels), repeats)
    t_ml = median_time(lambda: pb.predict(lin, fix, w_u, x), repeats)
    t_fwd = median_time(lambda: forward(x), repeats)
    kappa = ml.largest_eigenvalue(state) / ml.config.mu
    return {
        "gn_matvec_seconds": t_gn, "forward_backward_seconds": t_grad,
        "gn_matvec_over_forward_backward": t_gn / t_grad,
        "linearized_forward_seconds": t_ml, "forward_seconds": t_fwd, "linearized_over_forward": t_ml / t_fwd,
        "kappa": kappa, "summary": {"κ": f"{kappa:.1e}", "GN matvec / fwd+bwd": round(t_gn / t_grad, 2)},
    }


def crossover(job: ml_collections.ConfigDict, widths: Sequence[int], *, requests: int = 3) -> dict:
    """Direct vs matrix-free CG as the linearized size grows: where does the exact factorisation stop paying?

    For each hidden width the model's head is linearized (``P = (width + 1)·K``) on one shared core; the direct
    path (factor once, then a low-rank removal per request) and Newton-CG (warm start, same tolerance) each forget
    the same ``requests`` disjoint requests after a warm-up request. The crossover is the smallest ``P`` at which
    the direct path's time amortised over the stream, ``(build + Σ forget) / requests``, exceeds CG's mean request
    time (``None`` if it never does within the sweep).
    """
    from jaxforget.methods.mixed_linear.method import MixedLinear  # pylint: disable=import-outside-toplevel

    splits = data_lib.get_splits(job.data)
    device_mesh = mesh_lib.make_mesh(job.num_devices or None)
    user = np.asarray(splits.user_ids)
    size = max(1, int(round(job.requests.fraction * len(user))))
    order = np.random.default_rng(job.requests.seed).permutation(user)
    plan = [np.sort(order[k * size : (k + 1) * size]) for k in range(requests + 1)]
    rows = []
    for width in widths:
        cfg = job.copy_and_resolve_references()
        cfg.model.hidden = (int(width),)
        cfg.method.sigma = 0.0
        cfg.method.linearize = "head"
        row, core = {"width": int(width)}, None
        for path in ("direct", "cg"):
            cfg.method.solver = path
            ml = MixedLinear(models.get_model(cfg.model), splits, cfg.method, mesh=device_mesh)
            if core is None:  # one core serves both paths
                core = ml.train_core(jax.random.key(0))
            ml.reserve_capacity(sum(len(p) for p in plan))
            state = ml.init(jax.random.key(0), core=core)
            build_s = ml.direct_factor(state).build_seconds if path == "direct" else 0.0
            row["num_params"] = optax.tree.size(state.w_u)
            ml.forget(state, plan[0])  # warm-up: compiles outside the timing
            seconds = []
            for ids in plan[1:]:
                state, info = ml.forget(state, ids)
                seconds.append(info.seconds)
            row[path] = {"build_seconds": build_s, "forget_seconds": statistics.mean(seconds),
                         "amortised_seconds": (build_s + sum(seconds)) / len(seconds),
                         "memory_bytes": sum(ml.solver_memory_bytes().values()), "rel_residual": info.residual}
        rows.append(row)
        print(f"crossover: P={row['num_params']}: direct {row['direct']['amortised_seconds']:.3f} s amortised, "
              f"CG {row['cg']['forget_seconds']:.3f} s", flush=True)
    cross = next((r["num_params"] for r in rows if r["direct"]["amortised_seconds"] > r["cg"]["forget_seconds"]),
                 None)
    return {"requests": requests, "rows": rows, "crossover_num_params": cross,
            "markdown": crossover_markdown(rows, requests, cross)}


def crossover_markdown(rows: list[dict], requests: int, cross: int | None) -> str:
    """The crossover study as a table, with the requests after which the direct build has paid for itself."""
    lines = [f"Direct vs CG by size (head linearized, mean over {requests} requests after a warm-up; amortised = "
             "(build + Σ forget) / requests):", "",
             "| P | direct build s | direct forget s | direct amortised s | direct MiB | CG forget s | "
             "break-even requests |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d, cg = r["direct"], r["cg"]["forget_seconds"]
        # Requests after which the one-off build has paid for itself: build / (CG − direct) per request.
        even = f"{d['build_seconds'] / (cg - d['forget_seconds']):.1f}" if cg > d["forget_seconds"] else "never"
        lines.append(f"| {r['num_params']} | {d['build_seconds']:.3f} | {d['forget_seconds']:.4f} "
                     f"| {d['amortised_seconds']:.4f} | {d['memory_bytes'] / 2**20:.1f} | {cg:.4f} | {even} |")
    faster = all(r["direct"]["forget_seconds"] < r["cg"]["forget_seconds"] for r in rows)
    lines += ["", "Crossover: " + (f"amortised over this {requests}-request stream, direct stops paying at P ≈ "
                                   f"{cross}; per request it is "
                                   + ("faster at every P of the sweep." if faster else "not faster at every P.")
                                   if cross else "the direct path stays ahead over the whole sweep.")]
    return "\n".join(lines)


__all__ = ["BASELINES", "crossover", "describe", "profile", "readouts", "run_baseline", "sigma_sweep", "warm_up"]
