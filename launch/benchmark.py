"""Benchmark mixed-linear forgetting against in-process retrain baselines; writes benchmark.json.

  python -m launch.benchmark --config=configs/benchmark.py:quick --workdir=runs/benchmark_quick
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxforget import benchmark

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/benchmark.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where benchmark.json and the per-workload reports go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    benchmark.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
