"""Forget a stream of requests with one method and compare each with retraining from scratch.

  python -m launch.forget --config=configs/mixed_linear_digits.py:quick --workdir=runs/mlf
"""

from jaxforget import app, experiment

if __name__ == "__main__":
    app.run(experiment.run)
