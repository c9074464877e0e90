# Two commands: `make demo` and `make test`. Both build .venv from scratch if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: install demo compare test lint clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

$(VENV)/.installed: setup.py $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job on the embedded digits data: train, 10 sequential forget requests, retrain oracle, report + plots.
demo: install
	$(BIN)/python -m launch.forget --config=configs/mixed_linear_digits.py --workdir=$(WORKDIR)
	@echo "report: $(WORKDIR)/report.json  plots: $(WORKDIR)/*.png"

# Every registered method and baseline on 3 seeds against the retrain oracle: report.json, compare.md, PNGs.
compare: install
	$(BIN)/python -m launch.compare --config=configs/compare_digits.py --workdir=runs/compare
	$(BIN)/python -m launch.report runs/compare/report.json --readme

# Lint, then the whole suite (doctests of the package, tests, notebooks) on 2 workers.
test: install
	$(BIN)/ruff check jaxforget launch configs tests
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests jaxforget --doctest-modules

clean:
	rm -rf $(VENV) runs
