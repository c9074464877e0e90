"""Benchmark workloads for mixed-linear forgetting (timing ratios in one process, written to JSON).

Command:
  python -m launch.benchmark --config=configs/benchmark.py --workdir=runs/benchmark
  python -m launch.benchmark --config=configs/benchmark.py:quick --workdir=runs/benchmark_quick
  python -m launch.benchmark --config=configs/benchmark.py:full=0 --workdir=...   # without the κ≈1e6 workloads

Workloads (each a full forget job, see configs/mixed_linear_digits.py): digits with the head linearized, with and
without the Nyström preconditioner; digits with every layer linearized (κ ≈ 1e6): the dual direct path with an
explicit inverse, and Nyström-PCG with mixed-precision refinement (at tol 1e-5, and at 1e-2, where its error
meets the issue's 1e-3); a synthetic CIFAR-shaped workload (32×32×3
images, CNN). Runtime on 2 CPU cores: ~30 minutes (quick: ~1 minute);
on a GPU raise `synthetic_n`. Results: <workdir>/benchmark.json and one report.json per workload.
"""

from __future__ import annotations

import ml_collections

from configs import common, mixed_linear_digits


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
        # Full-pass kernels over 2 batches of 768 instead of 6 of 256: ~2x faster float64 passes on a CPU
        # (the forget and the CG baselines share these kernels; the SGD retrain keeps the paper's batch of 128).
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
                # correction) stops there instead of at ~1e-8 (the error reached is measured per request).
                "digits_full_cg_nystrom_loose": ("cg", "nystrom", 1e-2)}
        for name, (solver, pre, tol) in full.items() if arg.full else ():
            job = digits("all", solver, pre, arg.full_requests)
            if tol is not None:
                job.method.tol = tol
            # float32 CG stalls near a relative residual of 1e-3 at κ ≈ 1e6 (recorded as not converged): a
            # bounded budget keeps the run finite; the CG-retrain baseline shares it.
            job.method.maxiter = 5000
            job.eval.oracle_maxiter = 60000
            # Rank 800 of the core data's Gauss-Newton term: ~370 iterations to the loose tol against ~580 at 400
            # and ~300 at 1,200, whose larger apply costs more time than it saves on CPU.
            job.method.nystrom_rank = 800
            # The float32 CG forget is refined against float64 residuals (it would stall like the baseline);
            # the direct path holds the explicit dual inverse (a 3-request stream alone would not pay for its
            # build on CPU, so "auto" would take triangular solves: the build is reported apart and amortised).
            job.method.cg_precision = "refined"
            job.method.direct_inverse = "always"
            jobs[name] = job
        for solver, pre in (("auto", "none"), ("cg", "nystrom")):
            syn = digits("head", solver, pre, arg.full_requests)
            syn.data = ml_collections.ConfigDict(dict(name="synthetic", seed=0, n=arg.synthetic_n,
                                                      image_shape=(32, 32, 3), num_classes=10, test_fraction=0.2,
                                                      core_fraction=0.3))
            syn.model = ml_collections.ConfigDict(dict(name="cnn", channels=(16, 32), hidden=64, num_classes=10))
            syn.method.core.epochs = 15
            syn.method.batch_size = 1024  # the whole (800-sample) training set in one batch
            syn.method.nystrom_rank = 200
            syn.requests.fraction = 0.02
            jobs[f"synthetic_cifar_cnn_{'direct' if solver == 'auto' else 'cg_nystrom'}"] = syn
    c.workloads = ml_collections.ConfigDict(jobs)
    # Direct vs CG as P grows (digits, head linearized, hidden width sweeps P = (width + 1)·10).
    sweep = digits("head", "auto", "none", 3)
    sweep.method.core.epochs = 5
    c.crossover = ml_collections.ConfigDict(dict(
        job=sweep, requests=2 if arg.quick else 3,
        widths=(16, 32) if arg.quick else (64, 128, 256, 512)))
    # The evaluation's own cost at the challenge's shape (N models × M forget examples), beside the forget time.
    c.evaluation = ml_collections.ConfigDict(
        dict(n_models=16, num_examples=50, bruteforce_examples=10) if arg.quick
        else dict(n_models=512, num_examples=1000, bruteforce_examples=50))
    return c
