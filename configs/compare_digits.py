"""Mixed-linear forgetting, SAFE and SISA against the general-network baselines on scikit-learn's digits, 3 seeds.

Command:
  python -m launch.compare --config=configs/compare_digits.py --workdir=runs/compare
  python -m launch.compare --config=configs/compare_digits.py:quick --workdir=runs/compare_quick

Setup: the mixed-linear model of ``configs/mixed_linear_digits.py`` (MLP 64-128-128-10, linearized head, σ = 1e-4) and
the same with the paper's SGD solver; the baselines (retrain, finetune, neggrad, random_label) on the same MLP trained
on all training data (``configs/baselines_digits.py``); SAFE (8 shards in cliques of 2) and SISA (8 isolated shards) of
``configs/safe_digits.py``, whose linear heads train on a backbone that saw only the core data, so their gold standard
is the build without the forgotten ids on that backbone. Per seed one request of 15 % of the user ids (the ids every
method may forget; ≈150 samples, enough for the membership attacks), the same for every method. Each method is judged
against its own gold standard (mixed-linear: the exact retrain on the same core; SAFE/SISA: the adapters rebuilt from
scratch; the baselines: the MLP retrained from scratch), and, for the distributional scores, ``n_models`` independent
originals against 2 × ``n_models`` independent retrains (``originals=per_model``), cached under
``<workdir>/oracle_cache``. Runtime on 2 CPU cores: about a quarter of an hour (quick: a few minutes). Results:
``report.json``, ``compare.md`` and PNGs; the README's comparison table is generated from ``report.json``.
"""

from __future__ import annotations

import ml_collections

from configs import baselines_digits, common, mixed_linear_digits, safe_digits
from jaxforget import config as config_lib

BASELINES = ("retrain", "finetune", "neggrad", "random_label")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, seeds=3, n_models=64, sigma=1e-4, fraction=0.15, originals="per_model")
    c = config_lib.compare_job()
    c.seeds = tuple(range(arg.seeds))
    c.forget_fraction = arg.fraction
    c.eval.n_models = arg.n_models
    c.eval.originals = arg.originals
    # Model and method are the main jobs' (configs/mixed_linear_digits.py, configs/baselines_digits.py), so the
    # comparison and those jobs cannot drift apart.
    ml = mixed_linear_digits.get_config(f"quick={arg.quick},sigma={arg.sigma},linearize=head")
    c.data = ml.data
    c.methods.mixed_linear = config_lib.method_entry("mixed_linear", ml.model.to_dict(), baselines=("sgd_retrain",))
    c.methods.mixed_linear.method = ml.method
    sgd = config_lib.method_entry("mixed_linear", ml.model.to_dict(), baselines=("sgd_retrain",))
    sgd.method = ml.method.copy_and_resolve_references()
    sgd.method.solver = "sgd"
    c.methods.mixed_linear_sgd = sgd
    for name in BASELINES:
        job = baselines_digits.get_config(f"method={name},quick={arg.quick}")
        c.methods[name] = config_lib.method_entry(name, job.model.to_dict())
        c.methods[name].method = job.method
    for name, graph in (("safe", "cliques"), ("sisa", "isolated")):
        job = safe_digits.get_config(f"graph={graph},quick={arg.quick}")
        c.methods[name] = config_lib.method_entry(name, job.model.to_dict())
        c.methods[name].method = job.method
    if arg.quick:
        c.eval.n_models = min(arg.n_models, 16)
        c.eval.relearn.max_epochs = 10
    return c
