"""Benchmarks (pytest-benchmark); not part of the test suite: ``make bench``."""
