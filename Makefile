# Each target bootstraps .venv by itself with exactly the versions pinned in requirements/lock.txt
# (setup.cfg keeps the ranges; `make lock` re-resolves the pins). The venv is rebuilt from scratch
# when setup.cfg, pyproject.toml or the lock changes, so it never keeps a package the lock dropped.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
# Constraints, not requirements: `make demo` installs only the runtime part of the one lock.
# Without build isolation the build backend (setuptools, from the lock) is pinned too.
INSTALL := $(PY) -m pip install -q --constraint $(LOCK)
WORKDIR ?= runs/demo
# Large (> 32 MB) CPU buffers come from fresh mmaps that page-fault on every step; transparent huge
# pages make those faults 512x rarer (measured: jax elementwise 4.7 -> 14.6 GB/s on 256 MB arrays).
# See docs/design.md, "CPU speed".
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# `make lock LOCK_FLAGS=--upgrade` moves every pin to the newest release setup.cfg allows;
# `LOCK_FLAGS='--upgrade-package transformers'` moves one. Plain `make lock` keeps existing pins.
LOCK_FLAGS ?=
LOCK_VENV := .cache/lock-venv

.PHONY: demo test bench lock clean

$(VENV)/.base: setup.cfg pyproject.toml $(LOCK) requirements/check_lock.py
	$(PYTHON) -m venv --clear $(VENV)
	$(INSTALL) pip setuptools wheel packaging
	$(PY) requirements/check_lock.py
	$(INSTALL) --no-build-isolation -e .
	touch $@

# nodeps.in: SpeechBrain (the BEATs reference) without its torchaudio, which the locked torch
# has no wheel for; its other imports come with the test extra.
$(VENV)/.test: $(VENV)/.base requirements/nodeps.in
	$(INSTALL) --no-build-isolation -e '.[test,notebook]'
	$(INSTALL) --no-deps -r requirements/nodeps.in
	touch $@

demo: $(VENV)/.base
	$(PY) -m unimoe.main --config=configs/unimoe_tiny.py --workdir=$(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadgroup

# Performance scripts (ratios against peers measured in the same process); see benchmarks/RESULTS.md.
bench: $(VENV)/.test
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/train_blocks.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/data_pipeline.py

# Re-resolve requirements/lock.txt from setup.cfg, requirements/tools.in and requirements/nodeps.in
# with uv (pinned by the lock itself), for every platform and Python >= 3.11 at once
# (`--universal`); requirements/overrides.txt drops what nodeps.in's packages are installed without.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --constraint $(LOCK) uv
	$(LOCK_VENV)/bin/uv pip compile setup.cfg requirements/tools.in requirements/nodeps.in \
	  --override requirements/overrides.txt --all-extras --universal \
	  --python-version 3.11 --custom-compile-command 'make lock' $(LOCK_FLAGS) -o $(LOCK)

clean:
	rm -rf runs .cache
