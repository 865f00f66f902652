# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs vit_jax, summarises every shipped model (training lands with issue 5)
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

# Until the training loop lands (issue 5), the demo summarises every shipped config.
demo: $(VENV)/.base
	for c in configs/vit_*.py configs/r*_vit_*.py configs/demo.py; do $(PY) -m vit_jax.summary --config=$$c | tail -2; done

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.test
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) workdir
