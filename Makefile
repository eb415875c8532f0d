# The README's commands.  Each target creates .venv when needed and installs
# everything into it: torch first (a CPU wheel, pinned), then the pinned
# development tools and peers, then rlfuse itself (editable, no build isolation).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := -c requirements/constraints.txt
DEPS_STAMP := $(VENV)/.rlfuse-deps
PYTEST_ARGS ?=

.PHONY: demo test install deps bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(DEPS_STAMP): $(PY) requirements/dev.txt requirements/peers.txt requirements/peers-nodeps.txt requirements/constraints.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -r requirements/dev.txt
	$(PIP) install -q $(CONSTRAINTS) -r requirements/peers.txt
	$(PIP) install -q $(CONSTRAINTS) --no-deps -r requirements/peers-nodeps.txt
	touch $(DEPS_STAMP)

deps: $(DEPS_STAMP)

install: $(DEPS_STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(VENV)/bin/rlfuse info

demo: install
	$(VENV)/bin/rlfuse bench logprob --quick

test: install
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build
