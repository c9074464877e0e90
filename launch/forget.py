"""Forget: one request on a trained workdir (``--ids``), or a config's planned stream judged against retraining.

  python -m launch.forget --workdir=runs/model --ids=ids.txt [--request_id=ticket-17]     # after launch.train
  python -m launch.forget --workdir=runs/model --ids=3,17,42 --noise_seed=7   # reproducible noise, recorded
  python -m launch.forget --config=configs/mixed_linear_digits.py:quick --workdir=runs/mlf  # the planned stream
"""

from absl import app as absl_app
from absl import flags

from jaxforget import app, experiment, workflow

IDS = flags.DEFINE_string("ids", None, "Ids to forget: a file (.txt/.csv/.npy) or a comma list; needs a trained "
                                       "--workdir (launch.train).")
REQUEST_ID = flags.DEFINE_string("request_id", None, "Name of the request (a replay of it is not applied twice).")
NOISE_SEED = flags.DEFINE_integer("noise_seed", None, "With --ids: seed of the request's noise key (reproducible and "
                                                      "recorded); by default the noise key is secret.")
RETRAIN_OVER_BUDGET = flags.DEFINE_bool("retrain_when_over_budget", False, "With --ids: when the summed residuals "
                                        "since the last exact state pass the config's residual_budget, publish the "
                                        "method's exact retrain instead.")
CONFIG = app.config_flag(required=False)
WORKDIR = app.workdir_flag()


def main():
    if IDS.value is not None:
        workflow.forget(WORKDIR.value, IDS.value, request_id=REQUEST_ID.value, config=CONFIG.value,
                        noise_seed=NOISE_SEED.value, retrain_when_over_budget=RETRAIN_OVER_BUDGET.value)
    elif CONFIG.value is None:
        raise absl_app.UsageError("Give --ids (a request on a trained workdir) or --config (the planned stream).")
    else:
        experiment.run(CONFIG.value, WORKDIR.value)


if __name__ == "__main__":
    app.main(main)
