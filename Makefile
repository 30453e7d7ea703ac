# cirlab: two commands on a fresh machine.
#   make demo   set up .venv (if needed) and regenerate reports/ on the embedded synthetic data
#   make test   set up .venv (if needed) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= notebooks,lite,dev
STAMP := $(VENV)/.cirlab-installed

.PHONY: demo test setup clean-reports bench help

help:
	@echo "make demo   - set up .venv and regenerate reports/ (synthetic data, CPU, < 10 min)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - run the bench/ scripts (writes reports/benchmarks/)"

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name cirlab --display-name "cirlab (.venv)" >/dev/null
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cirlab report

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) bench/metrics.py
	$(PY) bench/retrieval.py

clean-reports:
	find reports -mindepth 1 -maxdepth 1 ! -name benchmarks ! -name README.md -exec rm -rf {} +
