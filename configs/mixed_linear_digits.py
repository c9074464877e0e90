"""Mixed-linear forgetting on scikit-learn's digits: the main job (`make demo`).

Command:
  python -m launch.forget --config=configs/mixed_linear_digits.py --workdir=runs/mlf
  python -m launch.forget --config=configs/mixed_linear_digits.py:quick --workdir=runs/mlf_quick
  python -m launch.train --config=configs/mixed_linear_digits.py --workdir=runs/model   # then launch.forget --ids

Setup: MLP 64-128-128-10 with Leaky-ReLU 0.01; core = 30 % of each class of the train split (cross-entropy);
user weights on the linearized head, trained on all train data by an exact float64 solve; 10 sequential
requests of 1 % of the user data each, judged against the exact retrain, a float32 CG retrain and the paper's
50-epoch SGD retrain after each. Runtime on 2 CPU cores: about a minute (quick: under half a minute). Results:
<workdir>/report.json and <workdir>/*.png; the README's table is generated from report.json.
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxforget import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=10, sigma=1e-4, linearize="head")
    c = config_lib.forget_job("mixed_linear", model=common.DIGITS_MLP)
    c.method.linearize = arg.linearize
    c.method.sigma = arg.sigma
    c.requests.num_requests = arg.requests
    c.eval.baselines = ("cg_retrain", "sgd_retrain")
    if arg.quick:
        c.model.hidden = (32,)
        c.method.core.epochs = 10
        c.method.user.epochs = 10
        c.requests.num_requests = min(arg.requests, 3)
        c.method.sigma_sweep = (1e-4, 1e-2)
    return c
