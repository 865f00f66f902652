# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs vit_jax, trains the embedded default (digits) end to end
#   make test   creates .venv, installs vit_jax with its test extra, runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt

.PHONY: demo test test-slow lint clean

$(VENV)/.base: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m vit_jax.main --config=configs/demo.py --workdir=workdir/demo

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.test
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) workdir
