# LAVIS environment (optional, separate): salesforce-lavis 1.0.2 pins transformers<4.27, timm==0.4.12 and
# in practice numpy<2 / pandas<2.3, so it cannot live in cirlab's .venv. Nothing in `make test` / `make demo`
# needs it. Include from the Makefile (`include mk/lavis.mk`) or run `make -f mk/lavis.mk lavis`.
#   make lavis            create .venv-lavis (Python 3.11) and install requirements-lavis.txt (once, stamped)
#   make lavis-fixtures   regenerate tests/fixtures/lavis/ with tools/lavis_fixtures.py inside .venv-lavis
_LAVIS_PREVIOUS_GOAL := $(.DEFAULT_GOAL)

LAVIS_PYTHON ?= python3.11
LAVIS_VENV ?= .venv-lavis
LAVIS_PY := $(LAVIS_VENV)/bin/python
LAVIS_STAMP := $(LAVIS_VENV)/.lavis-installed
LAVIS_FIXTURES ?= tests/fixtures/lavis

.PHONY: lavis lavis-fixtures

# Re-install only when requirements-lavis.txt changes; the import check fails the target, not a later script.
$(LAVIS_STAMP): requirements-lavis.txt
	@sh mk/venv.sh $(LAVIS_VENV) '$(LAVIS_PYTHON)'
	$(LAVIS_PY) -m pip install --quiet --upgrade pip
	$(LAVIS_PY) -m pip install --quiet -r requirements-lavis.txt
	$(LAVIS_PY) -c "import lavis; from lavis.models import load_model_and_preprocess"
	@touch $@

lavis: $(LAVIS_STAMP)

lavis-fixtures: $(LAVIS_STAMP)
	$(LAVIS_PY) tools/lavis_fixtures.py --out $(LAVIS_FIXTURES)

# keep the including Makefile's default goal (an empty value lets make pick its next target, as before)
.DEFAULT_GOAL := $(_LAVIS_PREVIOUS_GOAL)
