# The two commands the README starts with: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
STAMP := $(VENV)/.kdprune-installed

.PHONY: setup demo test test-all bench-train clean

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)  ## short real compression demo on Fashion-MNIST (~4-6 min on 2 cores, no base training)
	bash scripts/demo.sh

test: $(STAMP)  ## fast test suite (what CI runs)
	$(PY) -m pytest -m "not slow" -q -n auto --dist loadfile  # one worker per core; a file stays on one worker (its fixtures are built once)

test-all: $(STAMP)  ## including slow tests
	$(PY) -m pytest -q

clean:
	rm -rf runs/demo .pytest_cache
