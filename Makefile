# Benchmarks; the test suite is scripts/check.sh. See benchmarks/conftest.py for the options.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
BENCH_ARGS ?=
# glibc maps tensors above 32 MB afresh; huge pages keep page faults from dominating (conftest.py).
BENCH_ENV ?= GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: bench bench-smoke

# Time per meta-iteration (learn2learn MAML, ADML, MAML-AD, Adversarial Querying) and attack
# throughput at the small and paper sizes, e.g. make bench BENCH_ARGS="--bench-threads=1".
bench:
	$(BENCH_ENV) $(PYTHON) -m pytest benchmarks $(BENCH_ARGS)

# Every benchmark once at a tiny size, untimed: checks that they run (CI).
bench-smoke:
	$(PYTHON) -m pytest benchmarks --bench-sizes=tiny --bench-rounds=1 --benchmark-disable -q
