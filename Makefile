# The two commands the README opens with:
#   make train   sets up .venv if missing, then a short CPU pretraining run (2 processes, EP=2)
#   make test    sets up .venv if missing, then the whole CPU test suite
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
ARGS ?=

.PHONY: setup train test clean

setup: $(VENV)/.installed

# torch is pinned first so that pip takes the CPU wheel on disk rather than a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,mpi,slurm]'
	touch $@

train: setup
	NPROC=$(NPROC) PYTHON=$(PY) launcher/run_local.sh experiment=shakespeare_cpu $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf runs outputs multirun .pytest_cache
