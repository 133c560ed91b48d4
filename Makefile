# Each target bootstraps .venv from setup.cfg by itself; re-installs when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# Large (> 32 MB) CPU buffers come from fresh mmaps that page-fault on every step; transparent huge
# pages make those faults 512x rarer (measured: jax elementwise 4.7 -> 14.6 GB/s on 256 MB arrays).
# See docs/design.md, "CPU speed".
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test bench clean

$(VENV)/.base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
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

clean:
	rm -rf runs .cache
