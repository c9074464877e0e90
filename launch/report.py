"""Render a report's table (a forget job's, a comparison's or the benchmark's), optionally into the README.

  python -m launch.report runs/demo/report.json [--readme [README.md]]
  python -m launch.report runs/compare/report.json --readme
  python -m launch.report runs/benchmark/benchmark.json --readme
"""

from jaxforget import report

if __name__ == "__main__":
    report.main()
