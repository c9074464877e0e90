"""Judge a trained workdir's current state against a retrain on its retained data, and verify the workdir.

  python -m launch.evaluate --workdir=runs/model                 # writes runs/model/evaluation.json
  python -m launch.evaluate --workdir=runs/model --verify_only   # ledger, checkpoint, config, data dependencies
"""

import json

from absl import flags

from jaxforget import app, workflow

VERIFY_ONLY = flags.DEFINE_bool("verify_only", False, "Only verify (no retrain); exit 1 if a check fails.")
WORKDIR = app.workdir_flag()


def main():
    if VERIFY_ONLY.value:
        result = workflow.verify(WORKDIR.value)
        print(json.dumps(result, indent=2))
        if not result["ok"]:
            raise SystemExit(1)
    else:
        workflow.evaluate_workdir(WORKDIR.value)


if __name__ == "__main__":
    app.main(main)
