"""Benchmarks: every number is a ratio against a baseline run in the same process, after warm-up.

For each workload the benchmark runs the forgetting job (:func:`jaxforget.experiment.run`), which measures per
request the Newton forget, a float32 CG retrain from zero to the same residual and the paper's SGD retrain, all
against the float64 exact retrain, and then adds kernel throughput ratios: one Gauss-Newton product over the
training set vs one plain forward+backward (cross-entropy gradient) over the same data, and the linearized
forward vs the plain forward. Results go to ``workdir/benchmark.json`` and a Markdown summary is printed.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections

from jaxforget import experiment, kernels, report, train


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compile outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_ratios(ml, state, repeats: int = 5) -> dict:
    """GN matvec / (forward + backward), and linearized forward / plain forward, over the training set."""
    lin, fix = ml.split(state.core)
    c = ml._weights(state.removed_by, jnp.float32)
    v = ml._replicated(kernels.tree_random_normal(jax.random.key(0), state.w_u))
    w_u = ml._replicated(state.w_u)
    model, core = ml.model, ml._replicated(state.core)
    labels = jnp.argmax(ml._t, axis=1)

    grad_fn = jax.jit(jax.grad(lambda p, x, y: train.cross_entropy(model.apply({**core, "params": p}, x), y)))
    forward = jax.jit(lambda x: model.apply(core, x))
    count = ml._count(state.removed_by, jnp.float32)
    t_gn = _median_time(lambda: ml._hessian_matvec(lin, fix, v, ml._x, c, count, ml.config.mu), repeats)
    t_grad = _median_time(lambda: grad_fn(core["params"], ml._x, labels), repeats)
    t_ml = _median_time(lambda: ml._predict(lin, fix, w_u, ml._x), repeats)
    t_fwd = _median_time(lambda: forward(ml._x), repeats)
    return {
        "gn_matvec_seconds": t_gn,
        "forward_backward_seconds": t_grad,
        "gn_matvec_over_forward_backward": t_gn / t_grad,
        "linearized_forward_seconds": t_ml,
        "forward_seconds": t_fwd,
        "linearized_over_forward": t_ml / t_fwd,
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every workload of ``config.workloads`` and writes ``workdir/benchmark.json``."""
    os.makedirs(workdir, exist_ok=True)
    results = {}
    for name, job in config.workloads.items():
        print(f"== workload {name}", flush=True)
        job_dir = os.path.join(workdir, name)
        rep = experiment.run(job, job_dir)
        _, ml = experiment.build(job)
        state = experiment.restore_latest_state(ml, job_dir)
        reqs = rep["requests"]
        entry = {
            "summary": rep["summary"],
            "initial": rep["initial"],
            "train_seconds": rep["train_seconds"],
            "recompilations_between_requests": rep["recompilations_between_requests"],
            "preconditioner": job.method.preconditioner,
            "solver": (rep.get("solver_choice") or {}).get("path", job.method.solver),
            "solver_choice": rep.get("solver_choice"),
            "direct_factor_seconds": rep.get("direct_factor_seconds"),
            "preconditioner_build_seconds": rep.get("preconditioner_build_seconds"),
            "num_linearized_params": kernels.tree_size(state.w_u),
            "kappa": ml.largest_eigenvalue(state) / job.method.mu,
            "per_request": [
                {
                    "request": r["request"],
                    "forget_seconds": r["forget"]["seconds"],
                    "forget_cg_iterations": r["forget"]["iterations"],
                    "forget_passes": r["forget"]["passes"],
                    "forget_converged": r["forget"]["converged"],
                    "forget_rel_residual": r["forget"]["rel_residual"],
                    "oracle": r["oracle"],
                    "forget_rel_error": r["solver_residual_rel"],
                    "influence_left": r["influence_left"],
                    "retrain": r["retrain"],
                    "forget_over_retrain_time": {k: r["forget"]["seconds"] / v["seconds"]
                                                 for k, v in r["retrain"].items()},
                    "retrain_passes_over_forget_passes": {k: v["passes"] / max(r["forget"]["passes"], 1)
                                                          for k, v in r["retrain"].items()},
                    "above_0.2_line_vs_sgd_retrain": (
                        r["forget"]["seconds"] / r["retrain"]["sgd_retrain"]["seconds"] > 0.2
                        if "sgd_retrain" in r["retrain"] else None
                    ),
                }
                for r in reqs
            ],
            "kernels": kernel_ratios(ml, state, repeats=config.repeats),
        }
        results[name] = entry
    out = {
        "environment": rep["environment"],
        "peak_host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workloads": results,
    }
    stats = [d.memory_stats() for d in jax.local_devices() if hasattr(d, "memory_stats")]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    if peaks:
        out["peak_device_bytes"] = max(peaks)
    report.write_json(out, os.path.join(workdir, "benchmark.json"))
    print(markdown(out), flush=True)
    return out


def _build_seconds(w: dict) -> str:
    """One-off build time (factorisation or preconditioner sketch), reported apart from the per-request time."""
    value = w.get("direct_factor_seconds") or (w.get("preconditioner_build_seconds") or None)
    return f"{value:.2f}" if value else "—"


def markdown(out: dict) -> str:
    """A summary table: medians over requests per workload."""
    lines = [
        f"device: {out['environment']['device_kind']}; jax {out['environment']['jax']}",
        "",
        "| workload | P | κ | solver | precond. | build s | CG its | passes | forget s | rel. error | influence left | "
        "forget/CG-retrain time | CG-retrain rel. err | forget/SGD-retrain time | SGD-retrain rel. err | "
        "GN matvec / fwd+bwd | recompiles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in out["workloads"].items():
        reqs = w["per_request"]

        def med(f, reqs=reqs):
            vals = [f(r) for r in reqs if f(r) is not None]
            return statistics.median(vals) if vals else float("nan")

        lines.append(
            f"| {name} | {w['num_linearized_params']} | {w['kappa']:.1e} | {w.get('solver', 'cg')} "
            f"| {w['preconditioner']} | {_build_seconds(w)} "
            f"| {med(lambda r: r['forget_cg_iterations']):.0f} | {med(lambda r: r['forget_passes']):.0f} "
            f"| {med(lambda r: r['forget_seconds']):.3f} "
            f"| {med(lambda r: r['forget_rel_error']):.1e} | {med(lambda r: r['influence_left']):.1e} "
            f"| {med(lambda r: r['forget_over_retrain_time'].get('cg_retrain')):.2f} "
            f"| {med(lambda r: r['retrain'].get('cg_retrain', {}).get('rel_error')):.1e} "
            f"| {med(lambda r: r['forget_over_retrain_time'].get('sgd_retrain')):.2f} "
            f"| {med(lambda r: r['retrain'].get('sgd_retrain', {}).get('rel_error')):.1e} "
            f"| {w['kernels']['gn_matvec_over_forward_backward']:.2f} | {w['recompilations_between_requests']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m jaxforget.benchmark runs/benchmark/benchmark.json [--readme [README.md]]
    import json
    import sys

    with open(sys.argv[1]) as f:
        table = markdown(json.load(f))
    if "--readme" in sys.argv[2:]:
        rest = sys.argv[sys.argv.index("--readme") + 1 :]
        report.update_readme(rest[0] if rest else "README.md", table, sys.argv[1], block="benchmark",
                             command=f"python -m jaxforget.benchmark {sys.argv[1]} --readme")
    else:
        print(table)
