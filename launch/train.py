"""Train the original of any method once and save it with an empty ledger (then forget requests over time).

  python -m launch.train --config=configs/mixed_linear_digits.py --workdir=runs/model
  python -m launch.forget --workdir=runs/model --ids=ids.txt --request_id=ticket-17
  python -m launch.evaluate --workdir=runs/model
"""

from jaxforget import app, workflow

if __name__ == "__main__":
    app.run(workflow.train)
