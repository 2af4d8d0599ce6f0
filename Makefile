# `make demo`, `make test` and `make bench` each create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Train the default tiny model on the Python standard library's source, then sample from it.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/meshlm train --out runs/demo --overwrite
	$(VENV)/bin/meshlm generate --run runs/demo --prompt "def " --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0

# Lint and format check over the whole repository, then the whole suite (what CI runs).
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Quick iterations: lint, then the suite without the tests marked slow.
test-fast: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The CPU benchmarks behind docs/benchmarks.md (about 35 minutes on 2 cores).
bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py --rounds 9 --steps 3
	OMP_NUM_THREADS=1 $(PY) benchmarks/parallel_overhead.py --steps 8
	OMP_NUM_THREADS=1 $(PY) benchmarks/generate_throughput.py --rounds 5 --threads 1
	OMP_NUM_THREADS=1 $(PY) benchmarks/checkpoint_io.py --size medium --repeats 3
	OMP_NUM_THREADS=1 $(PY) benchmarks/planner_accuracy.py cpu --repeats 2
	$(PY) benchmarks/planner_accuracy.py published
	$(PY) benchmarks/serve_load.py --rounds 2

clean:
	rm -rf $(VENV) runs .meshlm-cache .pytest_cache
