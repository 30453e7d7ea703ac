# cirlab: two commands on a fresh machine.
#   make demo   set up .venv (if needed) and regenerate reports/ on the embedded synthetic data
#   make test   set up .venv (if needed) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= notebooks,lite,dev
STAMP := $(VENV)/.cirlab-installed
$(if $(word 2,$(VENV)),$(error VENV must not contain spaces (make cannot name such a target): "$(VENV)"))
# what the stamp records: the checkout (a moved or copied .venv runs the old folder's code) and the extras installed;
# another value (or none: a stamp of an older Makefile) installs again
STAMP_TEXT := $(CURDIR)|$(EXTRAS)
ifeq ($(shell [ -f '$(STAMP)' ] && [ "$$(cat '$(STAMP)')" != '$(STAMP_TEXT)' ] && echo stale),stale)
.PHONY: $(STAMP)
endif
# the user's pip settings that would install outside the venv
export PIP_USER := 0
# notebook metadata JupyterLab adds on save that says nothing about the notebook (stripped at commit, with outputs)
NBSTRIP_KEYS := metadata.language_info.codemirror_mode metadata.language_info.file_extension \
	metadata.language_info.mimetype metadata.language_info.nbconvert_exporter \
	metadata.language_info.pygments_lexer metadata.language_info.version

.PHONY: demo test setup git-filter notebooks browser clean-reports bench help

help:
	@echo "make demo       - set up .venv and regenerate reports/ (synthetic data, CPU, about 3 min after setup)"
	@echo "make test       - set up .venv and run the test suite"
	@echo "make setup      - only set up .venv (PYTHON=python3.11 to choose the Python, EXTRAS=... the extras)"
	@echo "make notebooks  - pair notebooks/*.ipynb with their py:percent twins (jupytext --sync)"
	@echo "make browser    - install Debian's chromium for tests/test_browser.py (root, apt-get)"
	@echo "make bench      - run the bench/ scripts (writes reports/benchmarks/)"
	@echo "make clean-reports - remove the generated reports/ entries (keeps benchmarks/ and README.md)"
	@echo "make lavis      - the optional LAVIS environment .venv-lavis (make lavis-fixtures: its test fixtures)"

# Re-install only when the project's dependency list, the extras or the checkout's folder change. The build backend
# lives in the venv (no build isolation; pip and setuptools upgraded only where it is too old): a re-install after a
# change to pyproject.toml needs no network.
$(STAMP): pyproject.toml
	@sh mk/venv.sh $(VENV) '$(PYTHON)' '$(CURDIR)' $(STAMP)
	@$(PY) -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null || \
		$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name cirlab --display-name "cirlab (.venv)" >/dev/null
	@echo '$(STAMP_TEXT)' > $@

# Notebooks are committed without outputs: nbstripout as this checkout's git filter (.gitattributes names it), so
# running them in JupyterLab never dirties the repository. Cheap and idempotent: runs on every setup. The filter
# names the venv's Python relative to the checkout (git runs filters from its top): it holds after a move.
git-filter: $(STAMP)
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		$(VENV)/bin/nbstripout --install --python $(PY) --attributes .gitattributes && \
		git config filter.nbstripout.extrakeys "$(NBSTRIP_KEYS)"; \
	fi

setup: $(STAMP) git-filter

demo: setup
	$(VENV)/bin/cirlab report

test: setup
	$(PY) -m pytest -n 2 --dist loadfile

notebooks: setup
	$(VENV)/bin/jupytext --sync notebooks/*.ipynb

# Debian's Chromium for the browser test (it skips, saying why, where none can be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

bench: setup
	PY=$(PY) bash bench/run_all.sh

clean-reports:
	find reports -mindepth 1 -maxdepth 1 ! -name benchmarks ! -name README.md -exec rm -rf {} +

# The optional LAVIS environment (make lavis, make lavis-fixtures); it keeps this file's default goal.
-include mk/lavis.mk
