"""Small configs shared by the job-level tests: synthetic data and small models, so that whole jobs run in seconds."""

from __future__ import annotations

import ml_collections

from jaxforget import config as config_lib
from jaxforget import data as data_lib

TINY_MLP = dict(name="mlp", hidden=(16,), num_classes=10, activation="leaky_relu", leaky_slope=0.01)


def tiny_data(n: int = 400) -> ml_collections.ConfigDict:
    """Synthetic 8×8 grey images, 10 classes: ``n`` samples, 20 % test, 30 % of each class core."""
    data = data_lib.default_config()
    data.update(dict(name="synthetic", n=n, image_shape=(8, 8, 1), num_classes=10))
    return data


def tiny_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A method config shrunk to a few epochs (whatever the method)."""
    if "train" in config:
        config.train.epochs = 10
    if "epochs" in config:
        config.epochs = 1
    if "core" in config:
        config.core.epochs = 3
        config.user.epochs = 3
    if "backbone" in config:
        config.backbone.epochs = 3
        config.budget.epochs = 2
        config.budget.min_steps = 0  # epochs only: counted work is then exactly epochs · C_sum
        config.graph.shards = 4
    return config


def tiny_forget_job(method: str, requests: int = 2, **overrides) -> ml_collections.ConfigDict:
    """The forget job of ``method`` on :func:`tiny_data` with :data:`TINY_MLP`, ``requests`` requests of 2 %."""
    job = config_lib.forget_job(method, model=TINY_MLP)
    if method == "certified_removal":  # its Newton step is defined for L2-logistic regression only
        job.model.hidden = ()
    job.data = tiny_data()
    tiny_method(job.method)
    job.requests.num_requests = requests
    job.requests.fraction = 0.02
    for key, value in overrides.items():
        job[key] = value
    return job
