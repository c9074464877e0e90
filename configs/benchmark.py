"""Benchmark workloads (timing ratios in one process, written to JSON): mixed-linear and the baselines.

Command:
  python -m launch.benchmark --config=configs/benchmark.py --workdir=runs/benchmark
  python -m launch.benchmark --config=configs/benchmark.py:quick --workdir=runs/benchmark_quick
  python -m launch.benchmark --config=configs/benchmark.py:full=0 --workdir=...   # without the κ≈1e6 workloads

Workloads (each a full forget job, see configs/mixed_linear_digits.py and configs/baselines_digits.py): digits with
the head linearized, with and without the Nyström preconditioner; digits with every layer linearized (κ ≈ 1e6): the
dual direct path with an explicit inverse, and Nyström-PCG with mixed-precision refinement (at tol 1e-5, and at 1e-2,
whose error meets the 1e-3 target); a synthetic CIFAR-shaped workload (32×32×3 images, CNN); the general-network
baselines on digits. Studies: mixed-linear's direct-vs-CG crossover. Runtime on 2 CPU cores: about half an hour
(quick: about a minute); on a GPU raise ``synthetic_n``. Results: <workdir>/benchmark.json and one report.json per
workload.
"""

from __future__ import annotations

import ml_collections

from configs import baselines_digits, common, mixed_linear_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=5, full_requests=3, synthetic_n=1000, full=True)
    c = ml_collections.ConfigDict()
    c.repeats = 5
    jobs = {}

    def digits(linearize, solver, preconditioner, requests):
        job = mixed_linear_digits.get_config(f"requests={requests},sigma=0.0,linearize={linearize}")
        job.method.solver = solver
        job.method.preconditioner = preconditioner
        job.method.on_fail = "warn"  # a benchmark records non-convergence instead of stopping
        # The targets are stated against a plain-CG retrain to the forget's error (cg_to_error).
        job.eval.baselines = ("cg_retrain", "cg_to_error", "sgd_retrain")
        # Full-pass kernels over fewer, larger batches: faster float64 passes on a CPU (the forget and the CG
        # baselines share these kernels; the SGD retrain keeps the paper's batch of 128).
        job.method.batch_size = 768
        return job

    if arg.quick:
        job = digits("head", "cg", "none", 2)  # the matrix-free path (tests/test_direct.py covers the direct one)
        job.model.hidden = (32,)
        job.method.core.epochs = 10
        job.method.user.epochs = 10
        jobs["digits_head"] = job
    else:
        jobs["digits_head_direct"] = digits("head", "auto", "none", arg.requests)
        jobs["digits_head_cg"] = digits("head", "cg", "none", arg.requests)
        jobs["digits_head_cg_nystrom"] = digits("head", "cg", "nystrom", arg.requests)
        jobs["digits_head_cg_nystrom"].method.nystrom_rank = 400
        full = {"digits_full_direct": ("auto", "none", None), "digits_full_cg_nystrom": ("cg", "nystrom", None),
                # The targets are set at 1e-3 from the exact retrain: a residual tol of 1e-2 (one refined
                # correction) stops there instead of at float64 accuracy (the error reached is measured per request).
                "digits_full_cg_nystrom_loose": ("cg", "nystrom", 1e-2)}
        for name, (solver, pre, tol) in full.items() if arg.full else ():
            job = digits("all", solver, pre, arg.full_requests)
            if tol is not None:
                job.method.tol = tol
            # float32 CG stalls on this conditioning (recorded as not converged): a bounded budget keeps the run
            # finite; the CG-retrain baseline shares it.
            job.method.maxiter = 5000
            job.method.retrain_maxiter = 60000
            # A larger sketch of the core data's Gauss-Newton term cuts iterations; beyond this rank its apply
            # costs more time than it saves on a CPU (the rank sweep lives in the benchmark JSON).
            job.method.nystrom_rank = 800
            # The float32 CG forget is refined against float64 residuals (it would stall like the baseline);
            # the direct path holds the explicit dual inverse (a 3-request stream alone would not pay for its
            # build on CPU, so "auto" would take triangular solves: the build is reported apart and amortised).
            job.method.cg_precision = "refined"
            job.method.direct_inverse = "always"
            jobs[name] = job
        for solver, pre in (("auto", "none"), ("cg", "nystrom")):
            syn = digits("head", solver, pre, arg.full_requests)
            syn.data.name, syn.data.n, syn.data.image_shape = "synthetic", arg.synthetic_n, (32, 32, 3)
            syn.model = ml_collections.ConfigDict(dict(name="cnn", channels=(16, 32), hidden=64, num_classes=10))
            syn.method.core.epochs = 15
            syn.method.batch_size = 1024  # the whole (800-sample) training set in one batch
            syn.method.nystrom_rank = 200
            syn.requests.fraction = 0.02
            jobs[f"synthetic_cifar_cnn_{'direct' if solver == 'auto' else 'cg_nystrom'}"] = syn
        for name in ("finetune", "neggrad", "random_label", "retrain"):
            jobs[f"digits_{name}"] = baselines_digits.get_config(f"method={name},requests={arg.full_requests}")
    c.workloads = ml_collections.ConfigDict(jobs)
    # Targets (✓/✗ in the tables): per request, error ≤ 1e-3 from the exact retrain; ≤ 0.2× the time of the paper's
    # 50-epoch SGD retrain and of the gold-standard retrain (the challenge's efficiency line); ≥ 10× fewer passes
    # and ≥ 5× less time than a plain-CG retrain from zero to the same error.
    c.targets = ml_collections.ConfigDict(dict(
        max_rel_error=1e-3, max_time_ratio={"sgd_retrain": 0.2, "retrain": 0.2}, min_speedup={"cg_to_error": 5.0},
        min_pass_ratio={"cg_to_error": 10.0}))
    # Direct vs CG as P grows (digits, head linearized, hidden width sweeps P = (width + 1)·10).
    sweep = digits("head", "auto", "none", 3)
    sweep.method.core.epochs = 5
    c.studies = ml_collections.ConfigDict({"crossover": dict(
        method="mixed_linear", study="crossover",
        config=dict(job=sweep, requests=2 if arg.quick else 3, widths=(16, 32) if arg.quick else (64, 128, 256, 512)))})
    # The evaluation's own cost at the challenge's shape (N models × M forget examples), beside the forget time.
    c.evaluation = ml_collections.ConfigDict(
        dict(n_models=16, num_examples=50, bruteforce_examples=10) if arg.quick
        else dict(n_models=512, num_examples=1000, bruteforce_examples=50))
    return c
