"""SSSE on scikit-learn's digits: one second-order step per request on the whole trained small CNN (or MLP).

Command:
  python -m launch.forget --config=configs/ssse_digits.py --workdir=runs/ssse
  python -m launch.forget --config=configs/ssse_digits.py:quick --workdir=runs/ssse_quick
  python -m launch.forget --config=configs/ssse_digits.py:curvature=empirical_fisher,structure=woodbury ...
  python -m launch.forget --config=configs/ssse_digits.py:model=mlp ...

Setup: the small CNN of ``configs/common.py`` (``model=mlp``: the MLP 64-128-128-10) trained on the whole training
split with the classifier recipe (cross-entropy, SGD + momentum, coupled L2, cosine, 30 epochs); after training its
Gauss-Newton curvature is held block-diagonally (blocks of 256 entries of each leaf) in the state. Each request
erases 1 % of the training ids by one step and downdates the curvature by their terms; the gold standard is the
recipe from scratch on the retained data with the original's key. Runtime on 2 CPU cores: a few minutes (each
request pays one full retrain for the oracle; quick: under a minute).
Results: <workdir>/report.json.
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxforget import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=10, curvature="gauss_newton", structure="block", model="cnn")
    models = {"cnn": common.DIGITS_CNN, "mlp": common.DIGITS_MLP}
    if arg.model not in models:
        raise ValueError(f"Unknown model {arg.model!r} for this config; valid: {', '.join(models)}.")
    c = config_lib.forget_job("ssse", model=models[arg.model])
    c.requests.num_requests = arg.requests
    c.method.curvature = arg.curvature
    c.method.structure = arg.structure
    if arg.quick:
        if arg.model == "cnn":
            c.model.channels, c.model.hidden = (8, 16), 32
        else:
            c.model.hidden = (32,)
        c.method.train.epochs = 5
        c.requests.num_requests = min(arg.requests, 3)
    return c
