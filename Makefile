# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs vit_jax, trains a small ViT on the embedded digits dataset
#   make test   creates .venv, installs vit_jax with its test extra, runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt

.PHONY: demo demo-finetune test test-slow lint clean

$(VENV)/.base: setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "vit_jax needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1): make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

# The main job on the embedded default (scikit-learn's digits, built into a TFDS dataset on first use).
demo: $(VENV)/.base
	$(PY) -m vit_jax.main --config=configs/demo.py --workdir=workdir/demo

# Pre-train on digits at 16px, evaluate the pre-trained classifier at 32px (position embeddings resized), fine-tune
# at 32px with a new head (configs/demo_finetune.py).
demo-finetune: $(VENV)/.base
	$(PY) -m vit_jax.main --config=configs/demo_finetune.py:pretrain --workdir=workdir/ft_pre
	$(PY) -m vit_jax.main --config=configs/demo_finetune.py --workdir=workdir/ft_before --config.pretrained=workdir/ft_pre --mode=eval --config.model.representation_size=128
	$(PY) -m vit_jax.main --config=configs/demo_finetune.py --workdir=workdir/ft --config.pretrained=workdir/ft_pre

# Two pytest workers, one test file each at a time (a file's fixtures are built once): most tests wait on one
# XLA compile or one subprocess, so one process leaves a 2-core machine's second core mostly idle.
# The longest files go first (tests/conftest.py: LONGEST_FILES), not xdist's most-tests-first order.
test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.test
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) workdir
