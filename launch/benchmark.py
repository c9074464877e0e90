"""Benchmark mixed-linear forgetting against in-process retrain baselines; writes benchmark.json.

  python -m launch.benchmark --config=configs/benchmark.py:quick --workdir=runs/benchmark_quick
"""

from jaxforget import app, benchmark

if __name__ == "__main__":
    app.run(benchmark.run)
