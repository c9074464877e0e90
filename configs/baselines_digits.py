"""A general-network baseline on scikit-learn's digits: retrain, finetune, neggrad, random_label or fisher_forgetting.

Command:
  python -m launch.forget --config=configs/baselines_digits.py:method=finetune --workdir=runs/finetune
  python -m launch.forget --config=configs/baselines_digits.py:method=neggrad,quick --workdir=runs/neggrad_quick
  python -m launch.train --config=configs/baselines_digits.py:method=retrain --workdir=runs/mlp  # then --ids

Setup: the MLP 64-128-128-10 trained on the whole training split (cross-entropy, SGD + momentum, cosine, 30
epochs); every parameter may change. Each request forgets 1 % of the training ids; the gold standard is the same
recipe from scratch on the retained data with the original's key. Runtime on 2 CPU cores: a few minutes for 10
requests (each request pays one full retrain for the oracle; quick: under a minute). Results: <workdir>/report.json.
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxforget import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, method="finetune", requests=10)
    c = config_lib.forget_job(arg.method, model=common.DIGITS_MLP)
    c.requests.num_requests = arg.requests
    if arg.quick:
        c.model.hidden = (32,)
        c.method.train.epochs = 5
        c.requests.num_requests = min(arg.requests, 3)
        if "epochs" in c.method:
            c.method.epochs = 2
    return c
