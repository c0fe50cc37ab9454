# The two commands of the README:
#   make demo   set up, then sample -> extract -> merge -> validate for one pair
#   make test   set up, then run the test suite
# Everything installs into .venv from setup.py; nothing else is needed but python3.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PAIR   ?= eurusd
ROWS   ?= 10000
METHOD ?= polars
export BQX_DATA_DIR ?= data

.PHONY: setup demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m pipelines.demo --pair $(PAIR) --rows $(ROWS) --method $(METHOD)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(BQX_DATA_DIR) .pytest_cache
