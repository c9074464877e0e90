"""Every registered method and baseline on the same splits and seeds, in one table against retraining.

  python -m launch.compare --config=configs/compare_digits.py:quick --workdir=runs/compare_quick
"""

from jaxforget import app, compare

if __name__ == "__main__":
    app.run(compare.run)
