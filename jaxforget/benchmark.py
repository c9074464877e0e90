"""Benchmarks: every number is a ratio against a baseline run in the same process, after warm-up.

For each workload (a forget job config of any registered method) the benchmark runs the forget job
(:func:`jaxforget.experiment.run`), which times per request the forget, the method's gold-standard retrain and its
own timed baselines, all judged against the retrain; then the method's own throughput profile
(:meth:`~jaxforget.methods.base.Method.profile`). Method-specific studies (e.g. mixed-linear's direct-vs-CG
crossover) run through :meth:`~jaxforget.methods.base.Method.study`. Results go to ``workdir/benchmark.json`` and a
Markdown summary is printed (``python -m launch.report runs/benchmark/benchmark.json --readme`` puts it in the
README).
"""

from __future__ import annotations

import os
import resource
import statistics

import jax
import ml_collections
import numpy as np

from jaxforget import compat, distributional, experiment, methods, report, timing
from jaxforget import mesh as mesh_lib
from jaxforget import soak as soak_lib


def _wall(fn) -> tuple[object, float]:
    return timing.timed(fn)


def evaluation_timing(n_models: int, num_examples: int, bruteforce_examples: int, seed: int = 0) -> dict:
    """Evaluation cost at a population's shape: the challenge ε-score and KLOM over ``N`` models × ``M`` examples.

    The vectorised ε-score is compared with the per-example reference loop (a naive implementation, run on
    the first ``bruteforce_examples`` examples in the same process); both see the same synthetic φ (two
    slightly shifted Gaussian populations, so every threshold family is exercised).
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(0.2, 1.0, size=(n_models, num_examples))
    r = rng.normal(0.0, 1.0, size=(n_models, num_examples))
    acc = np.full(n_models, 0.9)
    distributional.example_epsilons(u[:, :4], r[:, :4])  # warm-up
    _, fast = _wall(lambda: distributional.challenge_score(u, r, retain_acc_unlearned=acc, retain_acc_retrain=acc,
                                                           test_acc_unlearned=acc, test_acc_retrain=acc))
    k = min(bruteforce_examples, num_examples)
    eps_fast, fast_k = _wall(lambda: distributional.example_epsilons(u[:, :k], r[:, :k]))
    eps_slow, slow_k = _wall(lambda: distributional._epsilons_bruteforce(u[:, :k], r[:, :k]))
    _, klom_s = _wall(lambda: distributional.klom(u, r))
    return {
        "n_models": n_models, "num_examples": num_examples,
        "challenge_score_seconds": fast,
        "klom_seconds": klom_s,
        "bruteforce_examples": k,
        "per_example_seconds_vectorised": fast_k / k,
        "per_example_seconds_loop": slow_k / k,
        "loop_over_vectorised": slow_k / max(fast_k, 1e-12),
        "max_abs_epsilon_difference": float(np.max(np.abs(eps_fast - eps_slow))),
    }


def workload(name: str, job: ml_collections.ConfigDict, job_dir: str, repeats: int) -> dict:
    """One workload: the forget job's per-request figures, as ratios against its in-process baselines."""
    rep = experiment.run(job, job_dir)
    method = methods.build(job)
    state = experiment.restore_latest_state(method, job_dir)
    reqs = rep["requests"]
    details = rep.get("method_details") or {}
    build = float(details.get("build_seconds") or 0.0)
    return {
        "method": rep["method"],
        "summary": rep["summary"],
        "initial": rep["initial"],
        "train_seconds": rep["train_seconds"],
        "recompilations_between_requests": rep["recompilations_between_requests"],
        "compile_seconds_in_requests": rep["compile_seconds_in_requests"],
        "details": details,
        "readouts": rep.get("method_readouts"),
        # One-off build spread over the stream: (build + Σ forget) / requests.
        "build_seconds": build,
        "amortised_forget_seconds": (build + sum(r["forget"]["seconds"] for r in reqs)) / max(len(reqs), 1),
        "per_request": [
            {
                "request": r["request"],
                "forget_seconds": r["forget"]["seconds"],
                "forget_iterations": r["forget"]["iterations"],
                "forget_passes": r["forget"]["passes"],
                "forget_residual": r["forget"]["residual"],
                "forget_solver": r["forget"]["solver"],
                "oracle": r["oracle"],
                "forget_rel_error": r["rel_weight_distance"],
                "influence_left": r["influence_left"],
                "retrain": r["retrain"],
                "forget_over_retrain_time": {k: r["forget"]["seconds"] / v["seconds"] for k, v in r["retrain"].items()},
                # With the one-off build (curvature, factor, sketch) charged to this request alone: the worst case.
                "forget_plus_build_over_retrain_time": {k: (build + r["forget"]["seconds"]) / v["seconds"]
                                                        for k, v in r["retrain"].items()},
                "retrain_passes_over_forget_passes": {k: v["passes"] / max(r["forget"]["passes"], 1)
                                                      for k, v in r["retrain"].items() if "passes" in v},
                "above_0.2_line": {k: r["forget"]["seconds"] / v["seconds"] > 0.2 for k, v in r["retrain"].items()},
            }
            for r in reqs
        ],
        "profile": method.profile(state, repeats=repeats),
    }


@compat.host_blas_threads(1)  # see compat.host_blas_threads: XLA keeps the cores while timing
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every workload, study and soak of ``config`` and writes ``workdir/benchmark.json``."""
    os.makedirs(workdir, exist_ok=True)
    results = {}
    workloads = config.get("workloads") or {}
    for name, job in workloads.items():
        print(f"== workload {name}", flush=True)
        results[name] = workload(name, job, os.path.join(workdir, name), int(config.repeats))
    soaks = config.get("soak") or ml_collections.ConfigDict(dict(jobs={}))
    first_job = next(iter([*workloads.values(), *soaks.jobs.values()]), None)
    env = experiment.environment(mesh_lib.make_mesh() if first_job is None else methods.build(first_job).mesh)
    out = {"environment": env, "targets": (config.get("targets") or ml_collections.ConfigDict()).to_dict(),
           "workloads": results, "studies": {}}
    for name, job in soaks.jobs.items():
        print(f"== soak {name}", flush=True)
        out.setdefault("soak", {})[name] = soak_lib.soak(job, requests=int(soaks.requests),
                                                         ids_per_request=int(soaks.ids_per_request))
    if out.get("soak"):
        out["soak_plot"] = soak_lib.plot(out["soak"], os.path.join(workdir, "soak.png"))
    for name, study in (config.get("studies") or {}).items():
        print(f"== study {name}", flush=True)
        out["studies"][name] = {"method": study.method, "study": study.study,
                                **methods.get_method(study.method).study(study.study, study.config,
                                                                         workdir=os.path.join(workdir, name))}
    if results:
        ev = config.evaluation
        timing_ = evaluation_timing(int(ev.n_models), int(ev.num_examples), int(ev.bruteforce_examples))
        forget = [r["forget_seconds"] for w in results.values() for r in w["per_request"]]
        timing_["median_forget_seconds"] = statistics.median(forget)
        timing_["challenge_score_over_forget"] = timing_["challenge_score_seconds"] / timing_["median_forget_seconds"]
        out["evaluation"] = timing_
    out["peak_host_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = [d.memory_stats() for d in jax.local_devices() if hasattr(d, "memory_stats")]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    if peaks:
        out["peak_device_bytes"] = max(peaks)
    report.write_json(out, os.path.join(workdir, "benchmark.json"))
    print(markdown(out), flush=True)
    return out


def _med(reqs, f) -> float:
    vals = [v for v in (f(r) for r in reqs) if v is not None]
    return statistics.median(vals) if vals else float("nan")


def _mark(ok: bool) -> str:
    """✓ / ✗ for a target met or missed."""
    return "✓" if ok else "✗"


def _fmt(value, spec: str = ".3g") -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def markdown(out: dict) -> str:
    """The benchmark's tables: medians over requests per workload, ratios against each in-process baseline, the
    targets the config names (✓/✗), then the method studies and the evaluation's own cost."""
    env = out["environment"]
    names = sorted({b for w in out["workloads"].values() for r in w["per_request"] for b in r["retrain"]},
                   key=lambda b: (b != "retrain", b))
    lines = [f"device: {env['device_kind']} × {env['num_devices']}; jax {env['jax']}", ""]
    if out.get("soak"):
        lines += [soak_lib.markdown(out["soak"]), ""]
    if not out["workloads"] and not out.get("studies"):
        return "\n".join(lines).rstrip()
    if out["workloads"]:
        lines += ["| workload | method | solver | details | build s | iterations | passes | forget s | amortised s | "
                  "rel. error | influence left | " + " | ".join(f"forget / {b} time" for b in names)
                  + " | recompiles |",
                  "|" + "---|" * (11 + len(names) + 1)]
    for name, w in out["workloads"].items():
        reqs = w["per_request"]
        summary = {**(w["details"].get("summary") or {}), **((w.get("readouts") or {}).get("summary") or {}),
                   **(w["profile"].get("summary") or {})}
        details = " · ".join(f"{k} {v}" for k, v in summary.items())
        ratios = [_fmt(_med(reqs, lambda r, b=b: r["forget_over_retrain_time"].get(b)), ".3f") for b in names]
        lines.append(
            f"| {name} | {w['method']} | {reqs[0]['forget_solver'] if reqs else '—'} | {details or '—'} "
            f"| {_fmt(w['build_seconds'], '.2f')} | {_fmt(_med(reqs, lambda r: r['forget_iterations']), '.0f')} "
            f"| {_fmt(_med(reqs, lambda r: r['forget_passes']), '.3g')} "
            f"| {_fmt(_med(reqs, lambda r: r['forget_seconds']), '.3f')} "
            f"| {_fmt(w['amortised_forget_seconds'], '.3f')} "
            f"| {_fmt(_med(reqs, lambda r: r['forget_rel_error']), '.1e')} "
            f"| {_fmt(_med(reqs, lambda r: r['influence_left']), '.1e')} | " + " | ".join(ratios)
            + f" | {w['recompilations_between_requests']} |")
    lines += _targets(out)
    for name, study in out.get("studies", {}).items():
        if study.get("markdown"):
            lines += ["", f"Study {name} ({study['method']}):", "", study["markdown"]]
    ev = out.get("evaluation")
    if ev:
        lines += ["", f"Evaluation cost (N = {ev['n_models']} models × M = {ev['num_examples']} examples): challenge "
                      f"ε-score {ev['challenge_score_seconds']:.2f} s, KLOM {ev['klom_seconds']:.2f} s; the "
                      f"vectorised ε-score is {ev['loop_over_vectorised']:.0f}× faster per example than the "
                      f"per-example loop (max |Δε| {ev['max_abs_epsilon_difference']:.1e}) and takes "
                      f"{ev['challenge_score_over_forget']:.1f}× the median forget request it would evaluate."]
    return "\n".join(lines)


def _targets(out: dict) -> list[str]:
    """Rows per workload and baseline with a target: median time ratio, pass ratio and the forget's error."""
    targets = out.get("targets") or {}
    max_time, min_speed = targets.get("max_time_ratio") or {}, targets.get("min_speedup") or {}
    min_passes, max_err = targets.get("min_pass_ratio") or {}, targets.get("max_rel_error")
    baselines = sorted(set(max_time) | set(min_speed) | set(min_passes))
    if not baselines:
        return []
    lines = ["", "Targets, per request (medians; a baseline that stopped at its iteration budget, or a forget that "
                 "makes no pass over the data, makes the ratio a bound, marked ≥):", "",
             "| workload | baseline | forget rel. error | forget / baseline time | baseline time ÷ forget time "
             "| baseline passes ÷ forget passes |", "|---|---|---|---|---|---|"]
    for name, w in out["workloads"].items():
        reqs = w["per_request"]
        err = _med(reqs, lambda r: r["forget_rel_error"])
        for b in baselines:
            sub = [r for r in reqs if b in r["retrain"]]
            if not sub:
                continue
            ratio = _med(sub, lambda r, b=b: r["forget_over_retrain_time"][b])
            reached = all(r["retrain"][b].get("converged", True) for r in sub)
            bound = "" if reached else "≥ "
            passes = _med(sub, lambda r, b=b: r["retrain_passes_over_forget_passes"].get(b))
            pass_bound = "≥ " if bound or _med(sub, lambda r: r["forget_passes"]) == 0 else ""
            cells = [f"{_fmt(err, '.1e')}" + (f" {_mark(err <= max_err)}" if max_err is not None else ""),
                     f"{ratio:.3g}" + (f" {_mark(ratio <= max_time[b])}" if b in max_time else ""),
                     f"{bound}{1 / ratio:.3g}" + (f" {_mark(1 / ratio >= min_speed[b])}" if b in min_speed else ""),
                     f"{pass_bound}{_fmt(passes)}" + (f" {_mark(passes >= min_passes[b])}" if b in min_passes else "")]
            lines.append(f"| {name} | {b} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":  # python -m jaxforget.benchmark runs/benchmark/benchmark.json: print the tables
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
