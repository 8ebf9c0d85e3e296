#!/usr/bin/env bash
# The test command: lint (ruff), format check, type check (mypy) and the test suite (pytest, one
# worker per core: pytest-xdist; a module's tests stay on one worker, so its fixtures run once).
#   bash scripts/check.sh            # everything
#   bash scripts/check.sh -k adml    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
"$BIN/mypy" l2l_adversarial
"$BIN/python" -m pytest -n auto --dist loadfile "$@"
