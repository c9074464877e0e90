"""L2-regularised multinomial logistic regression on scikit-learn's digits: SSSE with the exact curvature, Guo et al.'s
certified removal, Fisher forgetting or retraining, on a convex model trained to stationarity (spec ssse.md §10–§13).

Command:
  python -m launch.forget --config=configs/ssse_logreg_digits.py --workdir=runs/logreg_ssse
  python -m launch.forget --config=configs/ssse_logreg_digits.py:method=certified_removal --workdir=runs/logreg_cr
  python -m launch.forget --config=configs/ssse_logreg_digits.py:method=certified_removal,sigma=1 --workdir=...
  python -m launch.forget --config=configs/ssse_logreg_digits.py:method=ssse,curvature=gauss_newton --workdir=...
  python -m launch.forget --config=configs/ssse_logreg_digits.py:quick,method=fisher_forgetting --workdir=...

Setup: a linear softmax classifier (``mlp`` with ``hidden=()``) on the 64 pixels / 16 and a bias (``input_mean=0``,
``input_std=1``: the features of §13), P = 650 parameters, trained on the whole training split by the recipe's
full-batch Newton solver (``method.train.solver="newton"``) to a gradient norm of at most ``method.train.tol`` of the
mean cross-entropy plus ``(λ_wd/2)‖θ‖²`` with ``λ_wd = 1e-3`` (the sum-form λ of §11.7). Every method uses the same
recipe, so the originals and the retrain oracles (the same solver on the retained data from the original's key) are
shared between them, and the exact retrain is cheap. ``method`` is ``ssse`` (``curvature=hessian`` or
``gauss_newton``, equal for this model; dense, no damping, ε = 1: the Newton step with a downdated curvature),
``certified_removal`` (the Newton step recomputed at the current weights, with Guo et al.'s residual bound;
``sigma > 0`` perturbs the objective and reports the (ε, δ) certificate), ``fisher_forgetting`` (noise only) or
``retrain``. Each request erases 1 % of the training ids (about 14). Runtime on 2 CPU cores: a minute or two for 10
requests (quick: 3 requests, well under a minute); each request also retrains the oracle. Results:
<workdir>/report.json.
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxforget import config as config_lib

#: Multinomial logistic regression on the raw pixels in [0, 1] (no centring: the features of spec §13).
DIGITS_LOGREG = dict(name="mlp", hidden=(), num_classes=10, input_mean=0.0, input_std=1.0)
METHODS = ("ssse", "certified_removal", "fisher_forgetting", "retrain")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, method="ssse", requests=10, curvature="hessian", sigma=0.0)
    if arg.method not in METHODS:
        raise ValueError(f"Unknown method {arg.method!r} for this config; valid: {', '.join(METHODS)}.")
    c = config_lib.forget_job(arg.method, model=DIGITS_LOGREG)
    c.requests.num_requests = arg.requests
    t = c.method.train
    t.solver, t.tol, t.max_iter, t.weight_decay = "newton", 1e-6, 50, 1e-3
    if arg.method == "ssse":
        c.method.curvature = arg.curvature
        c.method.structure = "dense"
        c.method.damping = 0.0  # the exact curvature of a strongly convex objective needs none
    elif arg.method == "certified_removal":
        c.method.sigma = arg.sigma
    if arg.quick:
        c.requests.num_requests = min(arg.requests, 3)
    return c
