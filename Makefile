# Each target does its own set-up on a fresh machine: a virtual environment with the pinned CPU torch
# (see constraints.txt) and the package. GPU users bring their own torch and run `pip install -e .`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prescope-installed

.PHONY: report test lint lab

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 -e ".[test,lint]"
	touch $(STAMP)

report: $(STAMP)
	$(VENV)/bin/prescope trace --keep-hidden  # the router inputs: the predictors of notebook 03 read them
	$(VENV)/bin/prescope report

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check prescope tests

# JupyterLab on notebooks/ with this venv's kernel (start with 00_quickstart.ipynb)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks
