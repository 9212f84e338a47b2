# ExpertMesh entry points. `make run` and `make test` work on a fresh machine:
# they create .venv on first use (torch pinned first: torch==2.13.0 is the CPU
# build that lies on disk; any other spec would download a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv browser-deps run test test-all test-gpu bench clean help

help:
	@echo "make run       bring the platform up with the demo model (trains it the first time)"
	@echo "make test      create the environment if needed and run the default test suite"
	@echo "make test-all  include slow tests"
	@echo "make bench     run the benchmarks"

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	@# the fused CPU kernels (g++, ~30 s once; cached under ~/.cache/torch_extensions): never fails
	$(PY) -c "from expertmesh.model import cpu_kernels; print(cpu_kernels.status())"
	touch $(STAMP)

# The whole platform on the embedded defaults: local Ray, Valkey, gateway, a demo tenant + key,
# the demo model trained through the job queue when no checkpoint exists, an autoscaled endpoint.
run: $(STAMP)
	$(VENV)/bin/expertmesh up --demo

# The dashboard's browser tests drive Debian's Chromium headless through playwright (a test extra);
# `playwright install` is never used (it downloads browsers). Installs once, quietly; CI runs as root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@test -x /usr/bin/chromium || { echo "installing chromium (Debian) for the dashboard's browser tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	  --no-install-recommends chromium >/dev/null; }

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: $(STAMP) browser-deps
	@$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

test-all: $(STAMP) browser-deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test-all: no tests were collected" >&2; exit 1; fi; exit $$rc

test-gpu: $(STAMP)
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info platform/expertmesh/protos/_generated
