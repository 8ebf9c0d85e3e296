# Benchmarks; the test suite is scripts/check.sh. See benchmarks/conftest.py for the options.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
BENCH_ARGS ?=
# glibc maps tensors above 32 MB afresh, and the page faults distort CPU timings (conftest.py):
# preload tcmalloc where installed (apt-get install libtcmalloc-minimal4), else use huge pages.
TCMALLOC ?= $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4))
BENCH_ENV ?= $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC),GLIBC_TUNABLES=glibc.malloc.hugetlb=1)

.PHONY: bench bench-smoke

# Time per meta-iteration (learn2learn MAML, ADML, MAML-AD, Adversarial Querying) and attack
# throughput at the small and paper sizes, e.g. make bench BENCH_ARGS="--bench-threads=1".
bench:
	$(BENCH_ENV) $(PYTHON) -m pytest benchmarks $(BENCH_ARGS)

# Every benchmark once at a tiny size, untimed: checks that they run (CI).
bench-smoke:
	$(PYTHON) -m pytest benchmarks --bench-sizes=tiny --bench-rounds=1 --benchmark-disable -q

# On one GPU (meant for <= 5 minutes; unmeasured): every method x engine timed at paper size, the CUDA checks and the
# wall-time estimate of each reproduce.py table (scripts/gpu_check.py; results in gpu-check/).
# Without CUDA it says so and exits 0. E.g. make gpu-check GPU_CHECK_ARGS="--iterations 10".
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# The documentation site (MkDocs, Material theme, mkdocstrings): docs/ and mkdocs.yml, built into site/.
# docs-numbers reruns the commands whose output the README and docs/ quote (8-15 min on 2 cores).
.PHONY: docs docs-serve docs-numbers
docs:
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve:
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

docs-numbers:
	$(PYTHON) scripts/docs_numbers.py
