"""Forget a stream of requests with one method and compare each with retraining from scratch.

  python -m launch.forget --config=configs/mixed_linear_digits.py:quick --workdir=runs/mlf
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxforget import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<x>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, report.json and plots go; a rerun resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress lines are printed
    experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
