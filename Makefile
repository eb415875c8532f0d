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

.PHONY: demo test install deps bench gpu-check sanitize sanitize-ci fuzz clean

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
	$(VENV)/bin/rlfuse train grpo --overwrite_output_dir true

test: install
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

gpu-check:
	bash benchmarks/gpu_check.sh

# _C built with AddressSanitizer + UndefinedBehaviorSanitizer (separate build dir), the op
# tests run against it (the runtimes preloaded into python), then the normal build is
# reinstalled.  torch.compile, the Triton interpreter and RSS-measuring tests are left out.
SAN_PRELOAD = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)
SAN_INSTALL = RLFUSE_CUDA=OFF $(PIP) install -q --no-build-isolation --no-deps -e . \
	  -C build-dir=build/sanitize -C cmake.define.RLFUSE_SANITIZE=address,undefined
# --capture=sys: a sanitizer report (written to fd 2) reaches the log; pytest's default fd
# capture would swallow it when the process aborts.
SAN_RUN = LD_PRELOAD=$(SAN_PRELOAD) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(PY) -m pytest -q -p no:cacheprovider \
	  --capture=sys
SAN_RESTORE = $(PIP) install -q --no-build-isolation --no-deps -e .
sanitize: $(DEPS_STAMP)
	$(SAN_INSTALL)
	$(SAN_RUN) tests/ops tests/models -k "not compile and not triton and not peak_memory"; \
	  rc=$$?; $(SAN_RESTORE); exit $$rc

# The bounded subset CI runs after `make test` (a couple of minutes on 2 cores): the
# reliability property tests, error table and concurrent calls on the cpu backend, whose
# random shapes, views and extreme values drive every C++ kernel; the tree-search
# properties (cpu kernels against the Python reference: random trees, masks, extreme values);
# the lean decoder's kernels against float64 references and models; the LLM search's
# KV packing and decoding-step kernels (fused sampler, bookkeeping, raw-pointer guards).
SAN_CI_TESTS = tests/reliability/test_properties_logprob.py \
	  tests/reliability/test_properties_advantage.py tests/reliability/test_properties_policy.py \
	  tests/reliability/test_properties_search.py \
	  tests/reliability/test_errors.py tests/reliability/test_threads.py \
	  tests/models/test_lean_decode.py tests/search/test_lowlevel_guards.py \
	  tests/search/test_llm_hf.py
sanitize-ci: $(DEPS_STAMP)
	$(SAN_INSTALL)
	$(SAN_RUN) $(SAN_CI_TESTS) \
	  -k "(cpu and not triton and not blas) or row_raises or properties_search or lean_decode or lowlevel_guards or fused_step or decode_step or decode_loop or decode_kernel or packed_cache or first_cache or kernel_views"; \
	  rc=$$?; $(SAN_RESTORE); exit $$rc

# Longer property-based runs (hypothesis profile "fuzz" in tests/conftest.py).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf build
