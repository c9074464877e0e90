"""SSSE (Gauss-Newton and empirical Fisher) against retraining and the general-network baselines on scikit-learn's
digits, 3 seeds: random erasure of k ids, or whole-class erasure.

Command:
  python -m launch.compare --config=configs/compare_ssse.py --workdir=runs/compare_ssse_k100
  python -m launch.compare --config=configs/compare_ssse.py:k=10 --workdir=runs/compare_ssse_k10
  python -m launch.compare --config=configs/compare_ssse.py:whole_class=3 --workdir=runs/compare_ssse_class3
  python -m launch.compare --config=configs/compare_ssse.py:quick,k=10 --workdir=runs/compare_ssse_quick

Setup: the small CNN of ``configs/ssse_digits.py`` trained on the whole training split with the classifier
recipe; SSSE with its block-diagonal Gauss-Newton curvature (``ssse``) and with the empirical Fisher
(``ssse_fisher``), next to the baselines retrain, finetune, neggrad, random_label and Fisher forgetting (``BASELINES``;
certified removal needs a linear model: ``configs/ssse_logreg_digits.py``) on the same model
and recipe, so every method starts from the same trained network. Per seed one request, the same for every method:
``k`` ids drawn at random from the training split (``k=1``, ``10``, ``100``; default 100), or with
``whole_class=c`` every training id of class ``c`` (whole-class erasure; ``k`` is then not read). The warm-up
request that compiles each method before its timed request has the same size (for a class: drawn from the other
classes). Each method is judged against the CNN retrained from scratch on the retained data (SSSE's gold standard is
the same recipe), and, for the distributional scores, ``n_models`` independent originals against 2 × ``n_models``
independent retrains (``originals=per_model``), cached under ``<workdir>/oracle_cache``. With ``k=1`` the
cross-validated loss attack (``lr_loss_cv``) has too few members and is reported n/a. The report records the
selection under ``data.selection`` (and the config's ``forget_size`` / ``forget_class``).

Runtime on 2 CPU cores: quick, a few minutes; the full config is longer than ``compare_digits``' (SSSE and its
Fisher variant each train their own originals and retrain populations, and build a curvature per original).

Results: ``report.json``, ``compare.md`` and PNGs (accuracy, time ratios, ε, statistics, KLOM) in the workdir.
"""

from __future__ import annotations

import ml_collections

from configs import baselines_digits, common, ssse_digits
from jaxforget import config as config_lib

# The general-network baselines next to SSSE, each on SSSE's model and training recipe (certified_removal is defined
# for logistic regression only: configs/ssse_logreg_digits.py).
BASELINES = ("retrain", "finetune", "neggrad", "random_label", "fisher_forgetting")

# label → (curvature, structure) of the SSSE entries.
SSSE_VARIANTS = {"ssse": ("gauss_newton", "block"), "ssse_fisher": ("empirical_fisher", "block")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, seeds=3, n_models=64, k=100, whole_class=-1, originals="per_model")
    c = config_lib.compare_job()
    c.seeds = tuple(range(arg.seeds))
    if arg.whole_class >= 0:
        c.forget_class = arg.whole_class
    else:
        c.forget_size = arg.k
    c.eval.n_models = arg.n_models
    c.eval.originals = arg.originals
    # Model, recipe and SSSE's settings are the forget job's (configs/ssse_digits.py), so the comparison and that
    # job cannot drift apart; the baselines take the same model and recipe, so all start from one trained network.
    job = None
    for label, (curvature, structure) in SSSE_VARIANTS.items():
        job = ssse_digits.get_config(f"quick={arg.quick},curvature={curvature},structure={structure}")
        c.methods[label] = config_lib.method_entry("ssse", job.model.to_dict())
        c.methods[label].method = job.method
    c.data = job.data
    for name in BASELINES:
        entry = config_lib.method_entry(name, job.model.to_dict())
        entry.method = baselines_digits.get_config(f"method={name},quick={arg.quick}").method
        entry.method.train = job.method.train.copy_and_resolve_references()
        c.methods[name] = entry
    if arg.quick:
        c.eval.n_models = min(arg.n_models, 16)
        c.eval.relearn.max_epochs = 10
    return c
