"""Mixed-linear forgetting on scikit-learn's digits: the main job (`make demo`).

Command:
  python -m launch.forget --config=configs/mixed_linear_digits.py --workdir=runs/mlf
  python -m launch.forget --config=configs/mixed_linear_digits.py:quick --workdir=runs/mlf_quick

Setup: MLP 64-128-128-10 with Leaky-ReLU 0.01; core = 30 % of each class of the train split (cross-entropy);
user weights on the linearized head, trained on all train data by an exact float64 solve; 10 sequential
requests of 1 % of the user data each, with the float64 retrain oracle, a float32 CG retrain and the paper's
50-epoch SGD retrain after each. Runtime on 2 CPU cores: ~1 minute (quick: ~20 s). Results:
<workdir>/report.json and <workdir>/*.png; the README's table is generated from report.json.
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxforget import mixed_linear


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=10, sigma=1e-4, linearize="head")
    c = ml_collections.ConfigDict()
    c.method_name = "mixed_linear"

    # Data: embedded digits, stratified seeded splits.
    c.data = ml_collections.ConfigDict(dict(name="digits", seed=0, test_fraction=0.2, core_fraction=0.3))

    # Model.
    c.model = ml_collections.ConfigDict(
        dict(name="mlp", hidden=(128, 128), num_classes=10, activation="leaky_relu", leaky_slope=0.01)
    )

    # Method (see jaxforget.mixed_linear.default_method_config for every field).
    c.method = mixed_linear.default_method_config()
    c.method.linearize = arg.linearize
    c.method.sigma = arg.sigma

    # Requests: sequential, each a fixed-seed random draw of `fraction` of the user ids.
    c.requests = ml_collections.ConfigDict(dict(num_requests=arg.requests, fraction=0.01, seed=0))

    # Evaluation: float64 oracle, timed retrain baselines, noise sweep.
    c.eval = ml_collections.ConfigDict(
        dict(
            oracle_tol=1e-11,
            oracle_maxiter=50000,
            baselines=("cg_retrain", "sgd_retrain"),
            sigma_sweep=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        )
    )

    # Runtime.
    c.seed = 0
    c.num_devices = 0  # 0: all devices
    c.checkpoint_max_to_keep = 2

    if arg.quick:
        c.model.hidden = (32,)
        c.method.core.epochs = 10
        c.method.user.epochs = 10
        c.requests.num_requests = min(arg.requests, 3)
        c.eval.sigma_sweep = (1e-4, 1e-2)
    return c
