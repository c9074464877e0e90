"""Every method and baseline on scikit-learn's digits, 3 seeds, one table (issue: the evaluation harness).

Command:
  python -m launch.compare --config=configs/compare_digits.py --workdir=runs/compare
  python -m launch.compare --config=configs/compare_digits.py:quick --workdir=runs/compare_quick

Setup: the mixed-linear model of ``configs/mixed_linear_digits.py`` (MLP 64-128-128-10, linearized head,
σ = 1e-4); per seed one request of 15 % of the user ids (≈150 samples, enough for the membership attacks);
the retrain oracle (float64 exact minimiser, same core) and, for the distributional scores, ``n_models``
originals with independently trained cores, each unlearned by every method, against 2 × ``n_models`` retrains
with their own cores (``originals=per_model``; ``originals=single`` is the challenge's one-original protocol),
cached under ``<workdir>/oracle_cache``. Methods: the mixed-linear Newton forget (solver chosen automatically), the same
with the paper's SGD solver, and the fine-tune baseline. Results: ``report.json``, ``compare.md`` and PNGs;
the README's comparison table is generated from ``report.json``.
"""

from __future__ import annotations

import ml_collections

from configs import common, mixed_linear_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, seeds=3, n_models=64, sigma=1e-4, fraction=0.15, originals="per_model")
    # Data, model and method are the main job's (configs/mixed_linear_digits.py), so the two cannot drift apart.
    job = mixed_linear_digits.get_config(f"quick={arg.quick},sigma={arg.sigma},linearize=head")
    c = ml_collections.ConfigDict()
    c.method_name = "compare"
    c.data, c.model, c.method = job.data, job.model, job.method

    c.seeds = tuple(range(arg.seeds))  # each fixes core init and data order, the forget draw and noise keys
    c.forget_fraction = arg.fraction
    c.methods = ()  # empty: every entry of jaxforget.compare.REGISTRY
    c.finetune = ml_collections.ConfigDict(dict(epochs=5, batch_size=128, learning_rate=0.01, momentum=0.9))
    c.eval = ml_collections.ConfigDict(
        dict(
            n_models=arg.n_models,  # per population (the challenge's N); 2N oracles are cached
            # "per_model": N originals with their own cores, each unlearned once, vs 2N retrains with their own
            # cores (the spread of training itself); "single": the challenge's one original, the spread is the
            # method's noise σ only, which at σ = 1e-4 is below the metric's threshold grid (score n/a).
            originals=arg.originals,
            oracle_tol=1e-11,
            oracle_maxiter=50000,
            oracle_cache="",  # "": <workdir>/oracle_cache
            relearn=ml_collections.ConfigDict(
                dict(mode="forget_plus_retain", size=500, batch_size=128, learning_rate=0.01, momentum=0.9,
                     max_epochs=30)
            ),
        )
    )
    c.num_devices = 0
    if arg.quick:  # model and method are already the main job's quick variant
        c.eval.n_models = min(arg.n_models, 16)
        c.eval.relearn.max_epochs = 10
        c.eval.oracle_tol = 1e-9
    return c
